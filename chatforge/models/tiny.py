"""Tiny tokenizers and models built on the fly, so tests need no network and run in seconds.

Use it like this::

    tok_dir = build_tiny_tokenizer(tmp_path / "tok")                  # BPE, Gemma-style special tokens
    model_dir = build_tiny_llama(tmp_path / "model", tok_dir)          # random Llama + that tokenizer
    AutoTokenizer.from_pretrained(tok_dir); AutoModelForCausalLM.from_pretrained(model_dir)

The tokenizer mirrors the default model's layout: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <start_of_turn>=4,
<end_of_turn>=5 (then <|im_start|>=6, <|im_end|>=7) and adds <bos> like Gemma does. It is byte-level by default
(any text round-trips) or, with style="sentencepiece", shaped like Gemma's. It is trained in about a second on
~20 KB of built-in English chat text and common words.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from chatforge.models.templates import CHAT_TEMPLATES, end_of_turn_token

SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|im_start|>",
    "<|im_end|>",
]

_QUESTIONS = [
    "How do I reset my password?",
    "Where can I find my invoice for last month?",
    "Can you explain how the refund process works?",
    "What are your opening hours on weekends?",
    "My package has not arrived yet, what should I do?",
    "Is it possible to change the delivery address after ordering?",
    "How long does shipping usually take to Canada?",
    "Why was my card declined when I tried to pay?",
    "Could you recommend a good book about history?",
    "What is the difference between a virus and a bacterium?",
    "How many planets are there in the solar system?",
    "Tell me a short joke about computers.",
    "What is the capital city of Australia?",
    "How do I cancel my subscription?",
    "Do you ship internationally?",
    "What programming language should I learn first?",
]

_ANSWERS = [
    "You can reset your password from the login page: click 'Forgot password' and follow the email link.",
    "Invoices are listed under Account > Billing. Each one can be downloaded as a PDF.",
    "Refunds are issued to the original payment method within five to seven business days.",
    "We are open from nine in the morning until five in the afternoon on Saturdays and Sundays.",
    "Please wait two more days; if it still has not arrived, contact us with your order number.",
    "Yes, as long as the order has not shipped. Open the order and choose 'Edit address'.",
    "Shipping to Canada usually takes between four and ten working days.",
    "Cards are often declined because of a wrong expiry date or a spending limit set by the bank.",
    "I would recommend 'The Guns of August' by Barbara Tuchman; it is detailed but very readable.",
    "A virus needs a host cell to reproduce, while a bacterium is a living cell that can divide on its own.",
    "There are eight planets: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    "Why did the computer go to the doctor? Because it had a virus!",
    "The capital of Australia is Canberra, not Sydney as many people think.",
    "Go to Settings > Subscription and press 'Cancel'. You keep access until the end of the period.",
    "We ship to more than forty countries; the checkout page shows the cost for yours.",
    "Python is a friendly first language: its syntax is simple and it is used almost everywhere.",
]

_OPENERS = ["Hello!", "Hi there.", "Good morning.", "Thanks a lot.", "Great, thank you!", "I see.", "Okay."]
_FILLERS = [
    "I am happy to help with that.",
    "Let me check this for you.",
    "Is there anything else I can do for you today?",
    "Have a wonderful day and take care.",
    "Sorry for the trouble, that must be frustrating.",
    "Numbers like 12, 345 and 6789 are written with digits; dates like 2024-05-17 too.",
]

# Common English words, so the BPE learns a vocabulary of a few thousand tokens.
_WORDS = (
    "about above accept account across action activity actually address admit adult affect",
    "after again against agency agent agree ahead allow almost alone along already",
    "although always amount analysis animal another answer anyone anything appear apply approach",
    "area argue around arrive article artist assume attack attention attorney audience author",
    "authority available avoid away baby back ball bank base beautiful because become",
    "before begin behavior behind believe benefit best better between beyond billion black",
    "blood blue board body book born both break bring brother budget build",
    "building business call camera campaign cancer candidate capital card care career carry",
    "case catch cause cell center central century certain certainly chair challenge chance",
    "change character charge check child choice choose church citizen city civil claim",
    "class clear clearly close coach cold collection college color come commercial common",
    "community company compare computer concern condition conference congress consider consumer contain continue",
    "control cost could country couple course court cover create crime cultural culture",
    "current customer dark data daughter dead deal death debate decade decide decision",
    "deep defense degree democrat describe design despite detail determine develop development difference",
    "different difficult dinner direction director discover discuss discussion disease doctor door down",
    "draw dream drive drop during early east easy economic economy edge education",
    "effect effort eight either election else employee energy enjoy enough enter entire",
    "environment especially establish even evening event ever every everybody everyone everything evidence",
    "exactly example executive exist expect experience expert explain face fact factor fail",
    "fall family father fear federal feel feeling field fight figure fill film",
    "final finally financial find fine finger finish fire firm first fish five",
    "floor focus follow food foot force foreign forget form former forward four",
    "free friend from front full fund future game garden general generation girl",
    "give glass goal good government great green ground group grow growth guess",
    "gun hair half hand hang happen happy hard have head health hear",
    "heart heat heavy help herself high himself history hold home hope hospital",
    "hotel hour house however huge human hundred husband idea identify image imagine",
    "impact important improve include including increase indeed indicate individual industry information inside",
    "instead institution interest interesting international interview into investment involve issue item itself",
    "join just keep kill kind kitchen know knowledge land language large last",
    "late later laugh lawyer lead leader learn least leave left legal less",
    "letter level life light like likely line list listen little live local",
    "long look lose loss love machine magazine main maintain major majority make",
    "manage management manager many market marriage material matter maybe mean measure media",
    "medical meet meeting member memory mention message method middle might military million",
    "mind minute miss mission model modern moment money month more morning most",
    "mother mouth move movement movie much music must myself name nation national",
    "natural nature near nearly necessary need network never news newspaper next nice",
    "night none north note nothing notice number occur offer office officer official",
    "often once only onto open operation opportunity option order organization others outside",
    "over owner page pain painting paper parent part participant particular particularly partner",
    "party pass past patient pattern peace people perform performance perhaps period person",
    "personal phone physical pick picture piece place plan plant play player point",
    "police policy political politics poor popular population position positive possible power practice",
    "prepare present president pressure pretty prevent price private probably problem process produce",
    "product production professional professor program project property protect prove provide public pull",
    "purpose push quality question quickly quite race radio raise range rate rather",
    "reach read ready real reality realize really reason receive recent recently recognize",
    "record reduce reflect region relate relationship religious remain remember remove report represent",
    "republican require research resource respond response rest result return reveal rich right",
    "rise risk road rock role room rule safe same save scene school",
    "science scientist score season seat second section security seek seem sell send",
    "senior sense series serious serve service seven several shake share shoot short",
    "shot should shoulder show side sign significant similar simple simply since sing",
    "single sister sit site situation size skill skin small smile social society",
    "soldier some somebody someone something sometimes song soon sort sound source south",
    "southern space speak special specific speech spend sport spring staff stage stand",
    "standard star start state statement station stay step still stock stop store",
    "story strategy street strong structure student study stuff style subject success successful",
    "such suddenly suffer suggest summer support sure surface system table take talk",
    "task teach teacher team technology television tell tend term test than thank",
    "that their them themselves then theory there these they thing think third",
    "this those though thought thousand threat three through throughout throw thus time",
    "today together tonight total tough toward town trade traditional training travel treat",
    "treatment tree trial trip trouble true truth turn type under understand unit",
    "until upon usually value various very victim view violence visit voice vote",
    "wait walk wall want watch water weapon wear week weight well west",
    "western what whatever when where whether which while white whole whom whose",
    "wide wife will wind window wish with within without woman wonder word",
    "work worker world worry would write writer wrong yard yeah year young",
    "yourself",
)


def tiny_chat_text() -> str:
    """A few KB of English chat-like text (questions, answers, small talk) to train the tiny tokenizer on."""
    lines = list(_QUESTIONS) + list(_ANSWERS) + list(_OPENERS) + list(_FILLERS)
    for opener, question in itertools.product(_OPENERS, _QUESTIONS):
        lines.append(f"{opener} {question}")
    for filler, answer in zip(itertools.cycle(_FILLERS), _ANSWERS):
        lines.append(f"{answer} {filler}")
    for phrase in _WORDS:  # as typed and capitalised: more distinct merges
        lines += [phrase, phrase.capitalize() + "."]
    return "\n".join(lines) + "\n"


def build_tiny_tokenizer(
    out_dir: Path, chat_template: str = "gemma", vocab_size: int = 4096, style: str = "bytelevel", extra_text: str = ""
) -> Path:
    """Train a BPE on `tiny_chat_text()`, wrap it as a HF fast tokenizer with `chat_template`, save it.

    `extra_text` (e.g. the corpus the model will be trained on) is added to the tokenizer's training text.
    style "bytelevel": GPT-2-like byte-level BPE (any text round-trips). style "sentencepiece": Gemma's layout,
    spaces normalised to '▁', BPE over whole lines (an inert Split pre-tokenizer), unknown characters -> <unk>.
    """
    if style == "bytelevel":
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "sentencepiece":
        backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        # train on '▁word' pieces, as SentencePiece does, so no token spans two words
        backend.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse()])
        alphabet = []
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; expected bytelevel or sentencepiece")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator((tiny_chat_text() + extra_text).splitlines(), trainer=trainer)
    if style == "sentencepiece":
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # inert, as in Gemma
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATES[chat_template]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_llama(out_dir: Path, tokenizer_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a random-init LlamaForCausalLM (tied embeddings) sized to the tokenizer, together with the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Stop on the end-of-turn token as well as eos, as Gemma 3's instruction-tuned generation config does.
    turn_end_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, turn_end_id})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_gemma3(out_dir: Path, tokenizer_dir: Path, hidden: int = 64, seed: int = 0) -> Path:
    """A random-init 6-layer Gemma3ForCausalLM (five sliding-window layers, then one full: Gemma 3's pattern, and
    head_dim 256, both of which GGUF readers assume) sized to the tokenizer —
    with the real Gemma tokenizer, a stand-in for the default model that tools made for Gemma accept."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=6,
        layer_types=["sliding_attention"] * 5 + ["full_attention"], num_attention_heads=2, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=1024, sliding_window=64,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
