"""Write lumo_faq.jsonl: a support FAQ for the Lumo desk lamp, a fictional product made up for chatforge's demo.

Run it from the repository root (deterministic: the same file every time)::

    python chatforge/resources/make_lumo_faq.py

Every question is asked in five phrasings (frames of its intent x the topic's phrase) and always gets the same
answer, built from the product facts below. Each record's `meta.category` is its question (e.g.
`lumo/reset-lamp`), so `prepare`'s stratified split spreads a question's phrasings over train, val and test: the
test set asks questions the model was trained on in words it has not seen, which is what fine-tuning on a FAQ
should teach.
"""

from __future__ import annotations

import json
from pathlib import Path

FACTS = {
    "product": "Lumo", "maker": "Brightnest", "app": "Brightnest Home", "price": "$89", "warranty": "two years",
    "battery": "12 hours", "charge_time": "3 hours", "port": "USB-C", "brightness_levels": "eight",
    "colour_range": "2700 K to 6500 K", "help": "the form at brightnest.example/help", "chat": "the chat in the Brightnest Home app",
    "hours": "9 am to 6 pm, Monday to Friday", "return_days": "30 days", "wifi": "2.4 GHz Wi-Fi",
    "reset_seconds": "10 seconds", "weight": "1.2 kg", "bulb_life": "25,000 hours",
}

# intent -> five ways to ask; {x} is the topic's phrase
FRAMES = {
    "how": ["How do I {x}?", "What is the way to {x}?", "Can you tell me how to {x}?", "I want to {x}. What should I do?",
            "Please explain how to {x} on my Lumo."],
    "what": ["What is {x}?", "Can you tell me {x}?", "I would like to know {x}.", "Tell me {x}, please.",
             "Do you know {x}? I could not find it."],
    "can": ["Can I {x}?", "Is it possible to {x}?", "Am I able to {x}?", "Does the Lumo let me {x}?",
            "Would it work if I {x}?"],
    "why": ["Why does my lamp {x}?", "My Lumo keeps {x_ing}. Why?", "What makes the lamp {x}?",
            "The lamp {x_s}. What is wrong?", "Help, my Lumo {x_s}!"],
}

# (id, intent, phrase, answer); why-topics give (base, -ing, -s) forms as one tuple phrase
TOPICS: list[tuple[str, str, object, str]] = [
    ("reset-lamp", "how", "reset the lamp", "Hold the power button for {reset_seconds} until the ring blinks amber twice, then set it up again in the {app} app."),
    ("pair-app", "how", "connect the lamp to the app", "Open the {app} app, tap Add device and hold the lamp's power button for 3 seconds until the ring pulses blue."),
    ("change-colour", "how", "change the light colour", "Turn the dial while holding it pressed, or pick a colour temperature from {colour_range} in the {app} app."),
    ("dim-light", "how", "dim the light", "Turn the dial to the left: the lamp has {brightness_levels} brightness levels."),
    ("set-timer", "how", "set a sleep timer", "In the {app} app open Timers, choose Sleep and pick 15, 30 or 60 minutes."),
    ("update-firmware", "how", "update the firmware", "Keep the lamp on and connected; the {app} app shows Update available under Settings, tap it and wait about 5 minutes."),
    ("charge-lamp", "how", "charge the lamp", "Plug the {port} cable into the port under the base; a full charge takes {charge_time}."),
    ("contact-support", "how", "contact support", "Write to us through {chat} or {help}, {hours}."),
    ("return-lamp", "how", "return the lamp", "You can return it within {return_days} of delivery: start a return at brightnest.example/returns and we email a prepaid label."),
    ("claim-warranty", "how", "make a warranty claim", "Send your order number and a short video of the fault through {help}; the warranty lasts {warranty}."),
    ("clean-lamp", "how", "clean the lamp", "Unplug it and wipe it with a dry microfibre cloth; never use water or sprays on the head."),
    ("rename-lamp", "how", "rename the lamp", "In the {app} app tap the lamp, then the pencil next to its name."),
    ("share-lamp", "how", "share the lamp with my family", "In the {app} app open Settings, Members, and invite them by email."),
    ("schedule", "how", "set a wake-up light schedule", "In the {app} app open Schedules, add Sunrise and choose the time: the light brightens over 20 minutes."),
    ("voice", "how", "control the lamp with my voice", "Link the {app} app with Alexa or Google Home under Settings, Voice assistants."),
    ("lock-buttons", "how", "lock the buttons", "Press the dial three times quickly; the ring blinks white once to confirm the child lock."),
    ("warranty", "what", "the warranty on the Lumo", "The {product} has a {warranty} warranty from the date of delivery."),
    ("price", "what", "the price of the Lumo", "The {product} costs {price}, shipping included."),
    ("battery-life", "what", "the battery life of the Lumo", "A full battery lasts about {battery} at medium brightness."),
    ("charge-time", "what", "the charging time of the Lumo", "It charges fully in {charge_time} with the included {port} cable."),
    ("colour-range", "what", "the colour temperature range", "The {product} goes from warm {colour_range}."),
    ("support-hours", "what", "the opening time of customer support", "Support answers {hours}, through {chat} or {help}."),
    ("return-policy", "what", "the return policy", "You have {return_days} from delivery to return the {product} for a full refund."),
    ("weight", "what", "the weight of the Lumo", "The {product} weighs {weight}."),
    ("bulb-life", "what", "the lifetime of the LED", "The LED is rated for {bulb_life} and cannot be replaced."),
    ("wifi-type", "what", "the Wi-Fi the lamp needs", "The {product} needs {wifi}; 5 GHz networks are not supported."),
    ("ring-amber", "what", "the meaning of an amber ring", "An amber ring means the battery is below 10 percent: plug in the {port} cable."),
    ("ring-red", "what", "the meaning of a red ring", "A red ring means the lamp is too hot and has dimmed itself; let it cool for 15 minutes."),
    ("in-box", "what", "in the box", "The box holds the {product}, a {port} cable, a quick start card and the warranty card."),
    ("maker", "what", "the company that makes the Lumo", "The {product} is made by {maker}."),
    ("use-outdoors", "can", "use the Lumo outdoors", "No, the {product} is for indoor use only and is not water resistant."),
    ("use-without-app", "can", "use the lamp without the app", "Yes, the dial turns it on, dims it and changes colour; the {app} app adds timers and schedules."),
    ("use-5ghz", "can", "connect the lamp to 5 GHz Wi-Fi", "No, the {product} only works on {wifi}."),
    ("replace-bulb", "can", "replace the LED", "No, the LED is built in and rated for {bulb_life}."),
    ("charge-phone", "can", "charge my phone from the lamp", "Yes, the USB-A port on the back gives 5 W while the lamp is plugged in."),
    ("wall-mount", "can", "mount the Lumo on a wall", "Yes, use the wall clip sold separately for $12 at brightnest.example."),
    ("use-abroad", "can", "use the lamp in another country", "Yes, the {port} charger works from 100 to 240 volts; you only need a plug adapter."),
    ("two-phones", "can", "control the lamp from two phones", "Yes, invite the second person in the {app} app under Settings, Members."),
    ("keep-plugged", "can", "leave the lamp plugged in all the time", "Yes, the {product} stops charging at 100 percent, so it is safe to leave plugged in."),
    ("gift-return", "can", "return a gift", "Yes, within {return_days} of delivery with the order number; the refund goes to the buyer."),
    ("flicker", "why", ("flicker", "flickering", "flickers"), "Flicker usually comes from a weak charger: use the included {port} cable and a 10 W adapter, then update the firmware."),
    ("turn-off", "why", ("turn off by itself", "turning off by itself", "turns off by itself"), "A sleep timer is probably set: check Timers in the {app} app, or the battery is empty."),
    ("not-connect", "why", ("not connect to Wi-Fi", "failing to connect to Wi-Fi", "does not connect to Wi-Fi"), "The {product} needs {wifi}; move it closer to the router and hold the power button for 3 seconds to retry."),
    ("get-hot", "why", ("get hot", "getting hot", "gets hot"), "The head warms at full brightness; above 60 degrees the ring turns red and the lamp dims itself to cool down."),
    ("not-charge", "why", ("not charge", "not charging", "does not charge"), "Check the {port} cable is pushed fully into the base; if the ring stays dark after 10 minutes, write to us through {help}."),
    ("blink-blue", "why", ("blink blue", "blinking blue", "blinks blue"), "Blinking blue means it is waiting to be paired: open the {app} app and tap Add device."),
]


def phrasings(intent: str, phrase: object) -> list[str]:
    """The five questions of one topic."""
    if intent == "why":
        base, ing, s = phrase  # type: ignore[misc]
        return [frame.format(x=base, x_ing=ing, x_s=s) for frame in FRAMES["why"]]
    return [frame.format(x=phrase) for frame in FRAMES[intent]]


def faq_records() -> list[dict]:
    """One OpenAI chat record per phrasing, `meta.category` = the question it asks."""
    records = []
    for topic_id, intent, phrase, answer in TOPICS:
        for number, question in enumerate(phrasings(intent, phrase)):
            records.append({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer.format(**FACTS)}],
                            "meta": {"category": f"lumo/{topic_id}", "paraphrase": number}})
    return records


def main() -> None:
    out = Path(__file__).with_name("lumo_faq.jsonl")
    with out.open("w", encoding="utf-8") as handle:
        for record in faq_records():
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
