"""`chatforge rate`: two runs answer the test prompts once, raters pick the better answer blind in a real browser,
and the results count exactly what they clicked, attributed to the right run, with Wilson intervals."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from chatforge.config import GenerationConfig
from chatforge.evaluate import rating
from chatforge.evaluate.rating import (
    build_rating_study,
    format_results,
    rating_results,
    read_prompts,
    wilson_interval,
)
from chatforge.evaluate.rating_app import create_rating_app
from chatforge.evaluate.rating_store import (
    AlreadyRatedError,
    RatingStore,
    UnknownItemError,
)
from tests.browser import chromium_page
from tests.models.test_run import prepared_dataset, tiny_run

GENERATION = GenerationConfig(max_new_tokens=12)


@contextmanager
def serving(store: RatingStore, study_id: int) -> Iterator[str]:
    """The rating app under a real uvicorn on a free loopback port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_rating_app(store, study_id), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        thread.join(0.01)
    assert server.started, "uvicorn did not start within 5 s"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rating")
    dataset = prepared_dataset(root, tiny_model_dir)
    return {"data": dataset,
            "a": tiny_run(dataset, tiny_model_dir, root / "run-a", "lora", lr=1e-2),
            "b": tiny_run(dataset, tiny_model_dir, root / "run-b", "full", seed=1)}


@pytest.fixture
def hand_made_study(tmp_path: Path) -> Iterator[tuple[RatingStore, int]]:
    """A study of three items with known answers, no models involved."""
    store = RatingStore(f"sqlite:///{tmp_path / 'hand.db'}")
    study = store.create_study("runs/a", "runs/b", "data/ds", "test")
    store.add_items(study.id, [(f"r{i}", [{"role": "user", "content": f"question {i}"}], f"A says {i}", f"B says {i}")
                               for i in range(3)])
    yield store, study.id
    store.close()


def item_ids(store: RatingStore, study_id: int) -> list[int]:
    return [item.id for item in store.study(study_id).items]


def test_page_in_chromium_rates_three_items_and_results_count_exactly_those_clicks(
    two_runs: dict[str, Path], tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'chatforge.db'}"
    study = build_rating_study(two_runs["a"], two_runs["b"], two_runs["data"], db_url, max_items=4,
                               generation=GENERATION)
    assert len(study.items) == 4 and study.run_a == str(two_runs["a"].resolve())
    items = {item.id: item for item in study.items}
    assert all(item.answer_a != item.answer_b for item in items.values())  # else a pick could not be attributed
    wanted = ["a", "tie", "b"]  # what the rater means to prefer on the first three items shown
    store = RatingStore(db_url)
    with serving(store, study.id) as url, chromium_page() as (page, console_errors):
        page.goto(url)
        page.fill("#rater", "ann")
        page.click("#start")
        shown_left: dict[int, str] = {}
        for step, preference in enumerate(wanted):
            page.wait_for_selector(f"#progress:has-text('{step} / 4 rated')")
            item = items[int(page.get_attribute("#item", "data-item-id"))]
            first, second = page.text_content("#answer-1"), page.text_content("#answer-2")
            assert {first, second} == {item.answer_a, item.answer_b}
            assert item.prompt[-1]["content"] in page.text_content("#prompt")
            shown_left[item.id] = "a" if first == item.answer_a else "b"
            if preference == "tie":
                page.fill("#comment", "both are odd")
                page.click("#choose-tie")
            elif preference == "a":
                page.click("#choose-left" if shown_left[item.id] == "a" else "#choose-right")
            else:  # by keyboard: 1 = Answer 1 is better, 2 = Answer 2 is better
                page.keyboard.press("1" if shown_left[item.id] == "b" else "2")
        page.wait_for_selector("#progress:has-text('3 / 4 rated')")
        assert int(page.get_attribute("#item", "data-item-id")) not in shown_left  # the fourth, unrated item
        page.reload()  # the name is remembered and the queue picks up where it was
        page.wait_for_selector("#progress:has-text('3 / 4 rated')")
        assert page.input_value("#rater") == "ann"
        assert console_errors == []
    stored = store.ratings(study.id)
    store.close()
    assert [(r.item_id, r.choice, r.shown_left) for r in stored] == [
        (item_id, choice, shown_left[item_id]) for item_id, choice in zip(shown_left, wanted)]
    assert stored[1].comment == "both are odd"
    results = rating_results(db_url)
    assert results["ratings"] == 3 and results["items_rated"] == 3 and results["study"]["items"] == 4
    assert [results[k]["count"] for k in ("a_wins", "ties", "b_wins")] == [1, 1, 1]
    assert results["per_rater"] == {"ann": {"a_wins": 1, "ties": 1, "b_wins": 1}}
    assert results["a_wins_decisive"]["count"] == 1 and results["a_wins_decisive"]["of"] == 2
    text = format_results(rating_results(db_url, run_a=str(two_runs["a"]), run_b=str(two_runs["b"])))
    assert "3 ratings of 3 items by 1 raters" in text and "ann: A 1, tie 1, B 1" in text


def test_building_again_reuses_stored_items_and_answers_only_new_prompts(
    two_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db_url = f"sqlite:///{tmp_path / 'reuse.db'}"
    first = build_rating_study(two_runs["a"], two_runs["b"], two_runs["data"], db_url, max_items=1,
                               generation=GENERATION)
    answered: list[tuple[str, int]] = []
    generate = rating.generate_answers
    monkeypatch.setattr(rating, "generate_answers",
                        lambda run, prompts, generation, *device: answered.append((run, len(prompts))) or generate(
                            run, prompts, generation, *device))
    grown = build_rating_study(two_runs["a"], two_runs["b"], two_runs["data"], db_url, max_items=3,
                               generation=GENERATION)
    assert answered == [(str(two_runs["a"]), 2), (str(two_runs["b"]), 2)]
    assert grown.id == first.id and grown.items[0] == first.items[0] and len(grown.items) == 3
    prompts = read_prompts(two_runs["data"] / "test.jsonl", 3)
    assert [(item.record_id, item.prompt) for item in grown.items] == prompts
    answered.clear()
    again = build_rating_study(two_runs["a"], two_runs["b"], two_runs["data"], db_url, max_items=3)
    assert answered == [] and again.items == grown.items


def test_wilson_interval_matches_published_values() -> None:
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)
    low, high = wilson_interval(60, 100)
    assert low == pytest.approx(0.5020, abs=1e-4) and high == pytest.approx(0.6906, abs=1e-4)
    with pytest.raises(ValueError, match="3/2"):
        wilson_interval(3, 2)


def test_two_raters_get_independent_queues(hand_made_study: tuple[RatingStore, int]) -> None:
    store, study_id = hand_made_study
    with serving(store, study_id) as url, httpx.Client(base_url=url) as client:
        seen_by_ann = []
        while not (next_item := client.get("/api/next", params={"rater": "ann"}).json())["done"]:
            seen_by_ann.append(next_item["item_id"])
            response = client.post("/api/rate", json={"item_id": next_item["item_id"], "rater": "ann",
                                                      "choice": "left"})
            assert response.status_code == 200, response.text
            assert response.json()["progress"] == {"rated": len(seen_by_ann), "total": 3}
        assert sorted(seen_by_ann) == item_ids(store, study_id)  # every item once, then done
        assert next_item["progress"] == {"rated": 3, "total": 3} and next_item["item_id"] is None
        bob = client.get("/api/next", params={"rater": "bob"}).json()
        assert not bob["done"] and bob["progress"] == {"rated": 0, "total": 3}
        assert set(bob) == {"done", "item_id", "prompt", "answer_1", "answer_2", "progress"}  # nothing says A or B


def test_double_rating_is_409_and_other_bad_requests_say_what_is_wrong(
    hand_made_study: tuple[RatingStore, int]
) -> None:
    store, study_id = hand_made_study
    item_id = item_ids(store, study_id)[0]
    rate = {"item_id": item_id, "rater": "ann", "choice": "tie"}
    with serving(store, study_id) as url, httpx.Client(base_url=url) as client:
        assert client.post("/api/rate", json=rate).status_code == 200
        again = client.post("/api/rate", json={**rate, "choice": "left"})
        assert again.status_code == 409 and "already rated item" in again.json()["detail"]
        unknown = client.post("/api/rate", json={**rate, "item_id": 999})
        assert unknown.status_code == 404 and "item 999 is not part of rating study" in unknown.json()["detail"]
        bad_choice = client.post("/api/rate", json={**rate, "rater": "bob", "choice": "A"})
        assert bad_choice.status_code == 422 and bad_choice.json()["detail"][0]["loc"] == ["body", "choice"]
        blank = client.get("/api/next", params={"rater": "   "})
        assert blank.status_code == 422 and "rater name" in blank.json()["detail"]
    assert [(r.rater, r.choice) for r in store.ratings(study_id)] == [("ann", "tie")]  # the rejected ones left no trace


def test_several_raters_rating_at_once_are_all_stored(hand_made_study: tuple[RatingStore, int]) -> None:
    store, study_id = hand_made_study
    raters = [f"rater{i}" for i in range(6)]
    failures: list[str] = []

    def rate_everything(rater: str, url: str) -> None:
        with httpx.Client(base_url=url) as client:
            while not (item := client.get("/api/next", params={"rater": rater}).json())["done"]:
                response = client.post("/api/rate", json={"item_id": item["item_id"], "rater": rater,
                                                          "choice": "right"})
                if response.status_code != 200:
                    failures.append(f"{rater}: {response.status_code} {response.text}")
                    return

    with serving(store, study_id) as url:
        threads = [threading.Thread(target=rate_everything, args=(rater, url)) for rater in raters]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert len(store.ratings(study_id)) == len(raters) * 3
    assert rating_results(store.db_url)["raters"] == len(raters)


def test_answer_order_varies_but_each_pick_is_credited_to_the_run_shown_there(
    hand_made_study: tuple[RatingStore, int]
) -> None:
    store, study_id = hand_made_study
    items = {item.id: item for item in store.study(study_id).items}
    expected: list[str] = []
    with serving(store, study_id) as url, httpx.Client(base_url=url) as client:
        for number in range(16):
            rater = f"r{number}"
            shown = client.get("/api/next", params={"rater": rater}).json()
            item = items[shown["item_id"]]
            assert {shown["answer_1"], shown["answer_2"]} == {item.answer_a, item.answer_b}
            expected.append("a" if shown["answer_1"] == item.answer_a else "b")  # the rater always picks Answer 1
            assert client.post("/api/rate", json={"item_id": item.id, "rater": rater, "choice": "left"}).is_success
    assert set(expected) == {"a", "b"}  # 16 coin flips all landing the same way: 1 in 32768
    assert [r.choice for r in store.ratings(study_id)] == expected
    results = rating_results(store.db_url)
    assert results["a_wins"]["count"] == expected.count("a") and results["ties"]["count"] == 0


def test_store_keeps_studies_items_and_ratings_on_sqlite_and_postgresql(database_url: str) -> None:
    store = RatingStore(database_url)
    study = store.create_study("runs/a", "runs/b", "data/ds", "test")
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo ✓"}]
    store.add_items(study.id, [("r1", prompt, "A answer", "B answer"), ("r2", prompt, "A2", "B2")])
    first, second = store.study(study.id).items
    assert (first.record_id, first.prompt, first.answer_b) == ("r1", prompt, "B answer")
    ann_left = store.shown_left(study.id, first.id, "ann")
    assert store.record(study.id, first.id, "ann", "left", " short ").choice == ann_left
    store.record(study.id, first.id, "bob", "tie")
    with pytest.raises(AlreadyRatedError, match="'ann' already rated item"):
        store.record(study.id, first.id, " ann ", "right")  # the same rater, however it is spaced
    other = store.create_study("runs/b", "runs/a", "data/ds", "test")
    with pytest.raises(UnknownItemError, match=f"item {first.id} is not part of rating study {other.id}"):
        store.record(other.id, first.id, "ann", "left")
    assert store.next_item(study.id, "ann") == second and store.progress(study.id, "ann") == (1, 2)
    assert store.find_study("runs/a", "runs/b", "data/ds", "test") == store.study(study.id)
    store.close()
    results = rating_results(database_url, run_a="runs/a", run_b="runs/b")
    assert (results["ratings"], results["ties"]["count"], results["per_rater"]["ann"]["ties"]) == (2, 1, 0)
    assert [r.comment for r in RatingStore(database_url).ratings(study.id)] == ["short", ""]


def test_results_of_a_study_without_ratings_say_so(hand_made_study: tuple[RatingStore, int]) -> None:
    store, _study_id = hand_made_study
    results = rating_results(store.db_url)
    assert results["ratings"] == 0 and results["study"]["items"] == 3 and results["per_rater"] == {}
    assert results["a_wins"] == {"count": 0, "of": 0, "rate": None, "low": None, "high": None}
    assert format_results(results).endswith("no ratings yet")


def test_results_name_the_study_of_the_given_runs_or_say_which_exist(
    hand_made_study: tuple[RatingStore, int], tmp_path: Path
) -> None:
    store, study_id = hand_made_study
    newer = store.create_study("runs/c", "runs/d", "data/ds", "test")
    assert rating_results(store.db_url)["study"]["id"] == newer.id  # the latest by default
    assert rating_results(store.db_url, run_a="runs/a", run_b="runs/b")["study"]["id"] == study_id
    with pytest.raises(LookupError, match="stored: runs/a vs runs/b, runs/c vs runs/d"):
        rating_results(store.db_url, run_a="runs/x")
    with pytest.raises(LookupError, match="chatforge rate RUN_A RUN_B"):
        rating_results(f"sqlite:///{tmp_path / 'empty.db'}")


def test_bad_split_files_are_refused_naming_file_and_line(tmp_path: Path) -> None:
    split = tmp_path / "test.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assistant_only = {"messages": [{"role": "assistant", "content": "only me"}]}
    for lines, expected in (([good, "{not json"], "test.jsonl:2: not valid JSON"), ([good, good, assistant_only],
                            "test.jsonl:3: no user turn before the last assistant turn")):
        split.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
        with pytest.raises(ValueError, match=expected):
            read_prompts(split)
    question = good["messages"][:1]
    assert read_prompts(split, max_items=2) == [("test.jsonl:1", question), ("test.jsonl:2", question)]
    with pytest.raises(FileNotFoundError, match="val.jsonl: no such split file"):
        build_rating_study("runs/a", "runs/b", tmp_path, f"sqlite:///{tmp_path / 'x.db'}", split="val")
