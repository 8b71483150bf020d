"""`chatforge ensemble`: combine finished runs into one run, by averaging their next-token probabilities or, as a
model soup, their weights.

Use it like this::

    make_ensemble([Path("runs/a"), Path("runs/b")], Path("runs/ab"), weights=[0.25, 0.75])
    make_ensemble([Path("runs/a"), Path("runs/b")], Path("runs/soup"), soup=True)
    load_run("runs/ab")        # chatforge.models.run: eval and serve load either one like any run

A probability ensemble (the default) keeps every member and answers with log(sum_i w_i softmax(logits_i)); the
members need only share a tokenizer (same vocabulary and chat template), not a base or an architecture. It writes
OUT/ensemble.json (members' absolute run dirs and normalised weights), OUT/tokenizer/, OUT/chat_template.jinja and
OUT/manifest.json. Decoding costs the members' summed cost.

A soup (`soup=True`) averages the members' weights (LoRA adapters merged into their base first, full fine-tunes as
they are) into one full model, written as a normal run: OUT/model/, OUT/chat_template.jinja, OUT/manifest.json
(outputs.kind "full"). It needs runs fine-tuned from the same base (`lineage.base_model` equal in their manifests)
and costs one model at inference; it works when the runs stayed close to that base.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from chatforge.core.rundir import RunDir
from chatforge.manifest import MANIFEST_NAME, Manifest, read_manifest, sha256_file
from chatforge.models.run import (
    RunFiles,
    find_run,
    load_run,
    load_run_tokenizer,
)


class EnsembleError(ValueError):
    """A user-facing problem with the runs to combine (not runs, different tokenizers or bases, bad weights)."""


def parse_weights(text: str | None) -> list[float] | None:
    """"0.25,0.75" -> [0.25, 0.75]; None or "" -> None (equal weights)."""
    if not text:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise EnsembleError(f"--weights {text!r}: expected comma-separated numbers such as 0.5,0.5") from None


def normalise_weights(weights: list[float] | None, count: int) -> list[float]:
    """Equal weights for None; otherwise one positive finite number per run, scaled to sum to 1."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise EnsembleError(f"{len(weights)} weights for {count} runs; give one weight per run")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise EnsembleError(f"weights {weights}: every weight must be a positive number")
    total = sum(weights)
    return [w / total for w in weights]


def make_ensemble(runs: list[Path], out: Path, weights: list[float] | None = None, soup: bool = False,
                  device: str = "auto") -> Path:
    """Combine `runs` into the run directory `out` (see the module docstring) and return `out`.

    Raises EnsembleError (a ValueError) when the runs cannot be combined and FileNotFoundError for a missing run.
    """
    if len(runs) < 2:
        raise EnsembleError(f"an ensemble needs at least two runs, got {len(runs)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EnsembleError(f"{out} already exists and is not empty; choose another --out")
    members = [member_files(Path(run)) for run in runs]
    shares = normalise_weights(weights, len(members))
    manifest = Manifest.start("ensemble", config={"runs": [str(m.run_dir) for m in members], "weights": shares,
                                                  "soup": soup})
    manifests = [read_manifest(m.run_dir) for m in members]  # type: ignore[arg-type]
    base_model = shared_base(members, manifests) if soup else None
    with manifest.timed("check_tokenizers"):
        tokenizer = shared_tokenizer(members)

    if soup:
        with manifest.timed("average_weights"):
            model = average_weights(members, shares, device)  # before anything is written: a mismatch leaves no half run
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    run.template_file.write_text(tokenizer.chat_template, encoding="utf-8")
    if soup:
        model.save_pretrained(run.model_dir)
        tokenizer.save_pretrained(run.model_dir)
        manifest.outputs = {"model": RunDir.MODEL_DIR, "kind": "full", "chat_template": RunDir.TEMPLATE_FILE}
    else:
        run.write_ensemble_spec({"method": "probability_average",
                                 "members": [{"run": str(m.run_dir), "weight": w} for m, w in zip(members, shares)]})
        tokenizer.save_pretrained(run.ensemble_tokenizer_dir)
        manifest.outputs = {"ensemble": RunDir.ENSEMBLE_FILE, "kind": "ensemble",
                            "tokenizer": RunDir.ENSEMBLE_TOKENIZER_DIR, "chat_template": RunDir.TEMPLATE_FILE}

    lineage_members = []
    for files, share in zip(members, shares):
        manifest_path = files.run_dir / MANIFEST_NAME  # type: ignore[operator]
        manifest.add_input(manifest_path, run=str(files.run_dir), weight=share)
        lineage_members.append({"run": str(files.run_dir), "kind": files.kind, "weight": share,
                                "manifest_sha256": sha256_file(manifest_path)})
    manifest.extra["lineage"] = {"method": "soup" if soup else "probability_average", "members": lineage_members,
                                 **({"base_model": base_model} if soup else {})}
    manifest.counts = {"members": len(members)}
    manifest.write(out)
    return out


def member_files(run: Path) -> RunFiles:
    """The run at `run`, resolved to its run dir; it must be a finished chatforge run (model and manifest)."""
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such run directory")
    files = find_run(run)
    if files is None or files.run_dir is None or not (files.run_dir / MANIFEST_NAME).is_file():
        raise EnsembleError(f"{run}: not a finished chatforge run (expected {RunDir.MODEL_DIR}/ or "
                            f"{RunDir.ENSEMBLE_FILE} beside a {MANIFEST_NAME})")
    return RunFiles(files.kind, files.run_dir.resolve(), files.weights_dir.resolve(), files.tokenizer_dir.resolve())


def shared_tokenizer(members: list[RunFiles]) -> Any:
    """The first member's tokenizer, after checking every member has the same vocabulary and chat template."""
    first = load_run_tokenizer(members[0])
    first_vocab = first.get_vocab()
    for files in members[1:]:
        tokenizer = load_run_tokenizer(files)
        vocab = tokenizer.get_vocab()
        if vocab != first_vocab:
            differing = len(set(vocab.items()) ^ set(first_vocab.items()))
            raise EnsembleError(
                f"{files.run_dir}: its tokenizer's vocabulary differs from {members[0].run_dir}'s ({len(vocab)} vs "
                f"{len(first_vocab)} tokens, {differing} entries differ); ensemble members must share a tokenizer"
            )
        if tokenizer.chat_template != first.chat_template:
            raise EnsembleError(
                f"{files.run_dir}: its chat template differs from {members[0].run_dir}'s; ensemble members must "
                f"format conversations the same way (compare their {RunDir.TEMPLATE_FILE})"
            )
    return first


def shared_base(members: list[RunFiles], manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The base model every member was fine-tuned from (their manifests' lineage.base_model), checked equal."""
    bases = []
    for files, manifest in zip(members, manifests):
        if files.kind == "ensemble":
            raise EnsembleError(f"{files.run_dir}: a probability ensemble has no weights of its own to soup; "
                                "give its member runs instead")
        base = manifest.get("lineage", {}).get("base_model")
        if not base:
            raise EnsembleError(f"{files.run_dir}/{MANIFEST_NAME}: no lineage.base_model; cannot tell which base "
                                "it was trained from, so it cannot be souped")
        bases.append(base)
    for files, base in zip(members[1:], bases[1:]):
        if base != bases[0]:
            raise EnsembleError(
                f"{files.run_dir} was fine-tuned from a different base model than {members[0].run_dir} "
                f"({_describe_base(base)} vs {_describe_base(bases[0])}); a soup averages weights, so its runs must "
                "share a base (use a probability ensemble, without --soup, instead)"
            )
    return bases[0]


def _describe_base(base: dict[str, Any]) -> str:
    return str(base.get("path") or base.get("id") or base)


def average_weights(members: list[RunFiles], shares: list[float], device: str = "auto") -> torch.nn.Module:
    """One model whose every parameter is sum_i share_i * member_i's (adapters merged first), in float32.

    Members are loaded one at a time: memory holds the running average and one member.
    """
    soup = load_run(members[0].run_dir, dtype=torch.float32, device=device).model  # type: ignore[arg-type]
    averaged = dict(soup.named_parameters())  # shared (tied) tensors appear once, so none is scaled twice
    with torch.no_grad():
        for parameter in averaged.values():
            parameter.mul_(shares[0])
        for files, share in zip(members[1:], shares[1:]):
            member = load_run(files.run_dir, dtype=torch.float32, device=device).model  # type: ignore[arg-type]
            parameters = dict(member.named_parameters())
            if parameters.keys() != averaged.keys():
                missing = sorted(parameters.keys() ^ averaged.keys())[:3]
                raise EnsembleError(f"{files.run_dir}: its parameters differ from {members[0].run_dir}'s "
                                    f"(e.g. {missing}); a soup needs the same architecture")
            for name, parameter in averaged.items():
                if parameters[name].shape != parameter.shape:
                    raise EnsembleError(f"{files.run_dir}: {name} has shape {tuple(parameters[name].shape)}, "
                                        f"not {tuple(parameter.shape)}; a soup needs the same architecture")
                parameter.add_(parameters[name], alpha=share)
            del member, parameters
    return soup

