"""`linearize publish`: check an exported checkpoint, stage a Hub-ready copy (full or deltas-only) with
its model card, and upload it through huggingface_hub.

Nothing is uploaded until every check passed, in this order: the export folder is complete; its weight
files are all there and byte-identical to export (sha256 recorded in fingerprint.json); the staged
copy loads with `AutoModelForCausalLM` + `trust_remote_code=True` in a fresh interpreter that cannot
import linearize, generates, and reproduces the logits recorded at export; its card validates. The
export folder is never modified: the upload is staged in a sibling folder `<folder>-hub-<mode>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from linearize import checkpoint
from linearize.architectures.modeling_linearize import base_probe, read_weights
from linearize.config import parse_pairs_into
from linearize.convert import checkpoint_check
from linearize.convert.card import CardError, check_card, model_card, read_report
from linearize.convert.export import MAX_SHARD_SIZE, file_digests
from linearize.convert.teachers import resolve_path
from linearize.errors import LinearizeError

MODES = ("full", "deltas")
REQUIRED = ("config.json", "recipe.yaml", "fingerprint.json", "conversion.json")
NOT_UPLOADED = (checkpoint.MARKER,)
TIED = ("lm_head.weight", "model.embed_tokens.weight")
PROBED = 3  # largest unchanged base tensors whose sums a deltas checkpoint records to recognise its base
CHECK_TIMEOUT_S = 3600  # loading a 70B checkpoint on CPU in a fresh process is slow, but not this slow


class PublishError(LinearizeError, RuntimeError):
    """A check failed or the upload did not happen; the message says which and what to do."""


@dataclasses.dataclass
class PublishSettings:
    """`linearize publish <folder> repo=org/name [key=value ...]`."""

    repo: str = ""
    """Hub repository id, org/name (required)."""
    mode: str = "full"
    """full: the whole converted model; deltas: only the parameters conversion added or changed."""
    private: bool = False
    """create the repository private (an existing repository keeps its visibility)."""
    revision: str = "main"
    """branch to upload to (created when missing)."""
    dry_run: bool = False
    """check and stage, print the files and the card, upload nothing."""
    base_model: str = ""
    """Hub id of the teacher for the card's base_model and a deltas checkpoint's loader (default: the
    recipe's teacher when it is a Hub id)."""
    base_path: str = ""
    """local folder of the teacher's weights, for mode=deltas (default: the recipe's teacher)."""
    base_revision: str = ""
    """Hub revision of the base model that a deltas checkpoint pins (default: the default branch)."""
    license: str = ""
    """licence id for the card (default: the teacher's, carried over from its model card)."""
    report: str = ""
    """eval report folder to put in the card (default: <run>/report beside the export, when present)."""
    device: str = ""
    """device of the load-and-generate check (default: cuda when available, else cpu)."""
    commit_message: str = ""

    @classmethod
    def from_pairs(cls, pairs: dict[str, str]) -> PublishSettings:
        """Settings from `linearize publish` `key=value` strings, read by `linearize.config.parse_pairs_into`."""
        settings = parse_pairs_into(cls, pairs, error=PublishError, what="publish setting")
        if settings.repo.count("/") != 1 or not all(settings.repo.split("/")):
            raise PublishError(f"repo must be a Hub id like org/name, got {settings.repo!r}")
        if settings.mode not in MODES:
            raise PublishError(f"mode must be one of {', '.join(MODES)}, got {settings.mode!r}")
        return settings


Uploader = Callable[..., str]


def hub_upload(folder: Path, repo: str, *, private: bool, revision: str, commit_message: str) -> str:
    """The one call that talks to the Hub: create the repo (and branch), upload the folder; returns the
    commit URL. huggingface_hub ≥ 2 uploads big folders in several resumable commits: rerunning the
    same command after a broken connection skips what already arrived."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=list(NOT_UPLOADED),
    )
    return str(info.commit_url)


def check_files(folder: Path) -> dict:
    """The folder is a complete export whose weight files are exactly the ones written at export;
    returns its fingerprint."""
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder; give the exported checkpoint (e.g. out/<run>/final)")
    if not checkpoint.is_complete(folder):
        raise PublishError(
            f"{folder} is not a complete export (no {checkpoint.MARKER} marker): rerun the convert"
        )
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise PublishError(
            f"{folder} lacks {', '.join(missing)}: it was exported by an older linearize; rerun "
            "`linearize convert` with the same recipe (finished stages are skipped) to export it again"
        )
    recorded = json.loads((folder / "fingerprint.json").read_text())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            raise PublishError(
                f"check 'files' failed: weight shard(s) {', '.join(absent)} missing from {folder}"
            )
    absent = sorted(name for name in recorded["files"] if not (folder / name).is_file())
    if absent:
        raise PublishError(f"check 'files' failed: weight file(s) {', '.join(absent)} missing from {folder}")
    found = file_digests(folder)
    extra = sorted(set(found) - set(recorded["files"]))
    if extra:
        raise PublishError(f"check 'files' failed: {', '.join(extra)} in {folder} were not written at export")
    changed = sorted(n for n, d in recorded["files"].items() if found[n] != d)
    if changed:
        raise PublishError(
            f"check 'checksums' failed: {', '.join(changed)} in {folder} differ from the files written at "
            "export (corrupted or modified); export again"
        )
    return recorded


def check_loads(folder: Path, base_path: str | None = None, device: str = "") -> dict:
    """Load, generate and compare the logits in a fresh interpreter that cannot import linearize."""
    command = [sys.executable, "-I", str(Path(checkpoint_check.__file__)), str(folder.resolve())]
    if base_path:
        command += ["--base-model-path", str(Path(base_path).resolve())]
    if device:
        command += ["--device", device]
    with tempfile.TemporaryDirectory() as scratch:
        # a private remote-code cache: no module cached from another folder with the same name is reused
        env = {**os.environ, "HF_MODULES_CACHE": scratch}
        try:
            done = subprocess.run(
                command, cwd=scratch, env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise PublishError(
                f"check 'load' failed: loading {folder} took over {CHECK_TIMEOUT_S} s"
            ) from None
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise PublishError(
            f"check 'load' failed: the checking process exited with {done.returncode}:\n{done.stderr[-3000:]}"
        ) from None
    if not result["ok"]:
        raise PublishError(f"check {result['check']!r} failed for {folder}: {result['detail']}")
    return result


def stage(folder: Path, target: Path, settings: PublishSettings, conversion: dict) -> dict:
    """Write the folder to upload into `target` (atomically): weights (all or deltas), config, code,
    tokenizer, card and report. Returns what the card needs to know about deltas (None for full)."""
    report_dir = Path(settings.report) if settings.report else folder.parent / "report"
    report = report_md = None
    if settings.report or (report_dir / "results.json").is_file():
        if not (report_dir / "results.json").is_file():
            raise PublishError(
                f"report={report_dir} holds no results.json; run `linearize eval model={folder}`"
            )
        report, report_md = read_report(report_dir)
        evaluated = Path(report["info"]["model"]).resolve()
        if evaluated != folder.resolve():
            raise PublishError(
                f"the report in {report_dir} evaluated {evaluated}, not {folder}; give report=<this model's "
                f"report> or run `linearize eval model={folder}`"
            )
    deltas = None

    def write(tmp: Path) -> None:
        nonlocal deltas
        skip = {checkpoint.MARKER, "README.md"}
        if settings.mode == "deltas":
            deltas = write_deltas(folder, tmp, settings, conversion)
            skip |= {p.name for p in folder.glob("*.safetensors*")} | {"config.json", "fingerprint.json"}
        for path in folder.iterdir():
            if path.name not in skip and path.is_file():
                _link(path, tmp / path.name)
        if report is not None:
            (tmp / "report").mkdir()
            for path in report_dir.iterdir():
                if path.suffix in (".md", ".json", ".png"):
                    shutil.copyfile(path, tmp / "report" / path.name)
        config = json.loads((folder / "config.json").read_text())
        card = model_card(
            (folder / "recipe.yaml").read_text(),
            _recipe_name(folder),
            config["linearize"],
            conversion,
            name=settings.repo,
            base_model=settings.base_model or None,
            license=settings.license or None,
            report=report,
            report_md=report_md,
            deltas=deltas,
        )
        (tmp / "README.md").write_text(card)

    checkpoint.write_atomic(target, write, info={"source": str(folder), "mode": settings.mode})
    return deltas


def write_deltas(folder: Path, tmp: Path, settings: PublishSettings, conversion: dict) -> dict:
    """The parameters that differ from the base model's (or that it lacks), their config naming the base
    model with a probe of its weights, and the fingerprint of the full model they reproduce."""
    import torch
    from huggingface_hub import save_torch_state_dict

    name = settings.base_model or conversion.get("teacher_hub_id")
    if not name:
        raise PublishError(
            f"mode=deltas needs the base model's Hub id (the teacher was {conversion['teacher']!r}): give "
            "base_model=org/name"
        )
    base_path = base_source(settings, conversion)
    try:
        base = read_weights(base_path)
    except Exception as err:
        raise PublishError(
            f"mode=deltas could not read the base model's weights from {base_path!r} ({err}); give "
            "base_path=<local folder of the teacher>"
        ) from err
    full = read_weights(str(folder))
    stored = set(base)  # what the base checkpoint holds under its own names: the probe reads these
    config = json.loads((folder / "config.json").read_text())
    if config.get("tie_word_embeddings"):  # a tied pair is saved under either name: compare it under both
        for state in (full, base):
            for a, b in (TIED, TIED[::-1]):
                if a not in state and b in state:
                    state[a] = state[b]
    changed = {
        n: t
        for n, t in full.items()
        if n not in base or base[n].shape != t.shape or not torch.equal(base[n].to(t.dtype), t)
    }
    same = sorted(set(full) - set(changed))
    if not same:
        raise PublishError(
            "every weight differs from the base model's: deltas would be the full model; use mode=full"
        )
    save_torch_state_dict(
        changed,
        tmp,
        max_shard_size=MAX_SHARD_SIZE,
        metadata={"format": "pt", "linearize_deltas_of": name},
    )
    for shard in tmp.glob("*.safetensors"):
        shard.chmod(0o644)
    config["linearize_base"] = {
        "name": name,
        "revision": settings.base_revision or None,
        "probe": base_probe(base, sorted(stored & set(same), key=lambda n: -base[n].numel())[:PROBED]),
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    fingerprint = json.loads((folder / "fingerprint.json").read_text())
    fingerprint["files"] = file_digests(tmp)
    (tmp / "fingerprint.json").write_text(json.dumps(fingerprint))
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    return {
        "base": name,
        "tensors": len(changed),
        "bytes": size(changed.values()),
        "fraction": size(changed.values()) / size(full.values()),
    }


def base_source(settings: PublishSettings, conversion: dict) -> str:
    """Where the base weights are read from here: base_path, else the recipe's teacher (a local folder
    or a Hub id resolved through the local cache)."""
    return settings.base_path or resolve_path(conversion["teacher"])


def listing(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file that would be uploaded."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in NOT_UPLOADED]
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in files]


def publish(
    folder: str | Path,
    settings: PublishSettings,
    upload: Uploader = hub_upload,
    log: Callable[[str], None] = print,
) -> dict:
    """Check, stage, (dry run: print; else) upload. Returns {"staged", "files", "card", "url"}."""
    folder = Path(folder)
    if not settings.dry_run:
        from huggingface_hub import get_token

        if not get_token():
            raise PublishError(
                "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or add dry_run=true to see what "
                "would be uploaded)"
            )
    check_files(folder)
    log(f"[publish] {folder}: files complete, checksums match the export")
    conversion = json.loads((folder / "conversion.json").read_text())
    license_ = settings.license or conversion.get("teacher_license")
    if not license_:
        raise PublishError(
            f"the teacher {conversion['teacher']!r} has no licence in its model card: give license=<id> (the "
            "teacher's licence, e.g. license=apache-2.0)"
        )
    target = folder.with_name(f"{folder.name}-hub-{settings.mode}")
    deltas = stage(folder, target, settings, conversion)
    if deltas:
        log(
            f"[publish] deltas: {deltas['tensors']} tensors, {deltas['bytes'] / 2**20:.2f} MiB "
            f"({deltas['fraction']:.1%} of the full weights), base {deltas['base']}"
        )
    base_path = base_source(settings, conversion) if deltas else None
    result = check_loads(
        target, base_path if base_path and Path(base_path).is_dir() else None, settings.device
    )
    log(
        f"[publish] {target}: loads without linearize, generates {result['generated']}, logits match the "
        f"export (relative RMS error {result['error']:.2g})"
    )
    card = (target / "README.md").read_text()
    try:
        check_card(card)
    except CardError as err:
        raise PublishError(f"check 'card' failed: {err}") from None
    files = listing(target)
    summary = {"staged": str(target), "files": files, "card": card, "url": None}
    if settings.dry_run:
        log(f"[publish] dry run: would upload to {settings.repo} (revision {settings.revision}):")
        for name, size in files:
            log(f"  {size:>14,}  {name}")
        log(f"  {sum(s for _, s in files):>14,}  total, {len(files)} files\n\n{card}")
        return summary
    message = settings.commit_message or f"Upload {_recipe_name(folder)} converted by linearize"
    try:
        url = upload(
            target,
            settings.repo,
            private=settings.private,
            revision=settings.revision,
            commit_message=message,
        )
    except Exception as err:  # network, auth, quota: all end the same way for the user
        raise PublishError(
            f"upload to {settings.repo} failed ({type(err).__name__}: {err}); {folder} and the staged copy "
            f"{target} are untouched: rerun the same command to retry (uploaded files are skipped)"
        ) from err
    log(f"[publish] uploaded to {url}")
    summary["url"] = url
    return summary


def _recipe_name(folder: Path) -> str:
    import yaml

    return (yaml.safe_load((folder / "recipe.yaml").read_text()) or {}).get("name", folder.name)


def _link(src: Path, dst: Path) -> None:
    """Hard-link (no copy of multi-GB weights) where the filesystem allows, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
