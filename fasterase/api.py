"""The Python API: erase, generate and evaluate, the same operations the CLI runs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .attacks import attack_config, load_found, save_found
from .attacks.run import attacked_rate, find, recognition_rate
from .attention import backend_processors
from .config import SamplingConfig, check_callables, check_count, check_paths, check_sampling, strings
from .edits import Edit, EditMetadata, apply_edit, bound_components, bound_fingerprints, check_edit, load_edit, load_key, save_edit
from .distributed import is_main, processes, ranks
from .errors import UserError, shown
from .evaluation.grid import grid_image, save_png, write_atomically
from .evaluation.judges import load_judge
from .evaluation.prompts import read_prompt_set
from .evaluation.quality import NO_CLIP, clip_scores, drift, image_features, scorer_for
from .evaluation.report import Share, concept_prompts, first_images, plan_for, recognition, report as make_report, sample_concepts
from .evaluation.sampling import generate as sample_images, sample_steps
from .lora import save_lora
from .methods import CONFIGS, Progress, erase_config, get_method
from .models.fingerprint import Fingerprints, fingerprints
from .models.family import family_of
from .models.loading import BUILTIN, DTYPES, load_pipeline, local_path, model_name, model_path, stored_dtype
from .models.text import check_concept


def default_device() -> torch.device:
    ranks()  # under torchrun: join the process group, and on GPUs take this process's GPU, first
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ensure_writable(path: Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fails before any work is done when `path` cannot be written: it is a folder or any other
    file that is not a regular one (a FIFO, a device), its folder is missing or read-only, or it
    is one of the command's `inputs` (the same file by any name) or lies inside an input folder (a
    model's)."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    if path.exists() and not path.is_file():
        raise UserError(f"cannot write {path}: it is not a regular file")
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {path}: folder {folder} is not writable")
    target = path.resolve()
    for given in inputs:
        source = Path(given).expanduser() if given else None
        if source is None or not source.exists():
            continue
        if target == source.resolve() or (path.exists() and os.path.samefile(path, source)):
            raise UserError(f"cannot write {path}: it is an input of this command")
        if source.is_dir() and source.resolve() in target.parents:
            raise UserError(f"cannot write {path}: it is inside the input folder {source}")
    return path


def key_path_for(edit_path: Path) -> Path:
    """KPOP's key goes beside the edit, in a file of its own."""
    return edit_path.with_name(edit_path.name.removesuffix(".safetensors") + ".key.safetensors")


def lora_path_for(edit_path: Path, concept: str) -> Path:
    """A concept's LoRA (MACE's save_loras) goes beside the edit."""
    return edit_path.with_name(f"{edit_path.name.removesuffix('.safetensors')}.lora-{_slug([concept])}.safetensors")


@dataclass
class EraseSummary:
    edit: Path
    key: Path | None
    seconds: float
    peak_memory_bytes: int
    device: str
    notes: list[str] = field(default_factory=list)
    loras: list[Path] = field(default_factory=list)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def erase(
    method: str,
    concepts: list[str] | None = None,
    *,
    model: str | Path | None = None,
    model_config: str | Path | None = None,
    out: str | Path | None = None,
    config: str | Path | None = None,
    preset: str | None = None,
    progress: Progress | None = None,
    notify: Callable[[str], None] = lambda line: None,
    **options: Any,
) -> EraseSummary:
    """Erases `concepts` from `model` (None: the built-in world; a single-file checkpoint with its
    `model_config` folder) with `method`, and writes the edit (and the key, for methods that have
    one). Options override the preset, then the YAML config.

    With dtype float16 or bfloat16 on a GPU the frozen weights are loaded in that dtype; on a CPU
    the run computes in float32 and says so. The edit's tensors are written in the base model's
    stored dtype (`edit_dtype` chooses another)."""
    cfg = erase_config(method, concepts, config=config, preset=preset, **options)
    check_paths(model=model, model_config=model_config, out=out)
    check_callables(progress=progress, notify=notify)
    method_class = get_method(method)
    if processes() > 1 and not method_class.shares_work:
        # every process would train alone and write its own edit and key over the others'
        sharing = [name for name in sorted(CONFIGS) if get_method(name).shares_work]
        raise UserError(f"{method} does not share its work under torchrun (each process would write its own edit); methods that do: {', '.join(sharing)}")
    device = default_device()
    if cfg.dtype != "float32" and device.type != "cuda":
        notify(f"no GPU here: {cfg.dtype} runs in float32")
        cfg.dtype = "float32"
    inputs = [local_path(model), model_config, config, *cfg.input_paths()]
    out = ensure_writable(Path(out) if out else Path(f"{method}-{_slug(cfg.concepts)}.safetensors"), inputs)
    ensure_writable(key_path_for(out), inputs)
    for concept in cfg.concepts if getattr(cfg, "save_loras", False) else []:
        ensure_writable(lora_path_for(out, concept), inputs)
    pipe = load_pipeline(model, dtype=cfg.dtype, device=device, model_config=model_config)
    edit_dtype = stored_dtype(model_path(model)) if cfg.edit_dtype == "base" else DTYPES[cfg.edit_dtype]
    for name in family_of(pipe).tokenizers:
        for concept in cfg.prompt_concepts():
            check_concept(getattr(pipe, name), concept)
    # Of every component the method may change, before it changes them in place; the edit (and each
    # LoRA) keeps those of the components it changed, the ones it binds to.
    base = fingerprints(pipe, family_of(pipe).components())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    # A forced backend runs every cross-attention layer of the run, sampling included, also in
    # methods that set no processors of their own (ESD, CA, fewshot).
    with backend_processors(pipe.unet, cfg.op_backend("cross_attention")):
        result = method_class().erase(pipe, cfg, progress)
    seconds = time.time() - start
    check_finite(result)
    result.tensors = {name: value.to(edit_dtype) for name, value in result.tensors.items()}
    metadata = EditMetadata(method=method, concepts=list(cfg.concepts), config=cfg.to_dict(), base_fingerprints=bound_fingerprints(base, result.tensors), base_model=model_name(model))
    key_file = None
    if result.key is not None:
        # the key is written with the edit, all or neither, and works with this edit alone
        metadata.key = secrets.token_hex(8)
        key_file = (key_path_for(out), result.key, {**result.key_metadata, "concepts": list(cfg.concepts)})
    loras = []
    writes = is_main()  # under torchrun, every process holds the same result and rank 0 writes it
    for concept, tensors in result.loras.items():
        loras.append(lora_path_for(out, concept))
        tensors = {name: value.to(edit_dtype) for name, value in tensors.items()}
        if writes:
            save_lora(loras[-1], tensors, {"method": method, "concept": concept, "base_fingerprints": bound_fingerprints(base, tensors)})
    if writes:
        save_edit(out, Edit(tensors=result.tensors, metadata=metadata), key_file)
    return EraseSummary(out, key_file[0] if key_file else None, seconds, _peak_memory(device), str(device), loras=loras)


def check_finite(result) -> None:
    """A UserError, before anything is written, when training left a tensor nan or inf (a
    non-finite gradient in the last steps, which no loss showed yet)."""
    if bad := [name for name, value in result.tensors.items() if not torch.isfinite(value).all()]:
        raise UserError(f"the erasure produced non-finite weights ({bad[0]}{' and more' if len(bad) > 1 else ''}); with --fp16 try --bf16 or float32, else a lower learning rate; nothing was written")


def _slug(concepts: list[str]) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(concepts).lower()).strip("-")[:60] or "concepts"


def load_edited(model=None, edit: str | Path | None = None, device: torch.device | None = None, model_config: str | Path | None = None):
    """A pipeline of the model's family (e.g. a StableDiffusionXLPipeline) with `edit` applied
    (refused if the edit was made for another base model)."""
    check_paths(model=model, edit=edit, model_config=model_config)
    pipe = load_pipeline(model, device=device or default_device(), model_config=model_config)
    if edit is not None:
        loaded = load_edit(edit)
        apply_edit(pipe, loaded, fingerprints(pipe, bound_components(pipe, loaded)))
    return pipe


def load_matching_key(key: str | Path | None, edits: list[Edit]) -> tuple[dict, dict] | None:
    """The tensors and metadata of `key` (None without one), refused unless it was written together
    with each of `edits` (which are checked against the base model themselves)."""
    if key is None:
        return None
    tensors, metadata = load_key(key)
    if not edits:
        raise UserError(f"the key {key} works with the edit it was written with: pass that edit too")
    if any(not edit.metadata.key or metadata.get("edit") != edit.metadata.key for edit in edits):
        raise UserError(f"the key {key} belongs to another edit: a key works with the edit it was written with alone")
    return tensors, metadata


def key_block(pipe, key: tuple[dict, dict] | None):
    """A block in which the pipeline runs with a key (`load_matching_key`) in place; a no-op without one."""
    if key is None:
        return contextlib.nullcontext()
    tensors, metadata = key
    if not isinstance(metadata.get("method"), str):
        raise UserError("this key names no method")
    return get_method(metadata["method"]).key_processors(pipe, tensors, metadata)


def generate(
    prompts: list[str],
    *,
    model=None,
    model_config=None,
    edit=None,
    key=None,
    n: int = 8,
    out: str | Path = "grid.png",
    sampling: SamplingConfig = SamplingConfig(),
) -> Path:
    """Samples n images per prompt and writes them as a grid, one row per prompt."""
    prompts = strings("prompts", prompts)
    if not prompts:
        raise UserError("prompts must hold at least one prompt")
    check_count("n", n)
    check_paths(model=model, model_config=model_config, edit=edit, key=key, out=out)
    check_sampling(sampling)
    out = ensure_writable(Path(out), [local_path(model), model_config, edit, key])
    loaded = [load_edit(edit)] if edit is not None else []
    matching_key = load_matching_key(key, loaded)
    pipe = load_pipeline(model, device=default_device(), model_config=model_config)
    for e in loaded:
        apply_edit(pipe, e, fingerprints(pipe, bound_components(pipe, e)))
    with key_block(pipe, matching_key):
        images = sample_images(pipe, [p for p in prompts for _ in range(n)], sampling)
    if is_main():  # under torchrun, every process drew its share and has them all
        save_png(grid_image([images[i * n : (i + 1) * n] for i in range(len(prompts))], prompts), out)
    return out


def evaluation_judge(judge: str | None, options: dict | None, model):
    """The judge of an evaluation (`fasterase.evaluation.judges`): `judge`, or by default the
    built-in world's classifier on the built-in model; other models need one named."""
    if options is not None and not isinstance(options, dict):
        raise UserError(f"judge_options must be a dict of the judge's options, not {shown(options)}")
    if judge is None:
        if model is not None and str(model) != BUILTIN:
            raise UserError(
                "evaluate needs a judge for a model other than the built-in world: --judge clip:DIR (a local CLIP folder),"
                " --judge nudenet, or --judge module:Class of your own"
            )
        judge = "world"
    return load_judge(judge, options)


# Base-model images of an evaluation plan, by (the base model's weights and scheduler, concepts, n,
# sampling): every edit of one base compared on the same plan samples the base model once per process.
_ORIGINAL_IMAGES: dict[tuple, dict[str, Share]] = {}


def _original_images(pipe, base: Fingerprints, judge, plan, sampling: SamplingConfig, progress) -> dict[str, Share]:
    model = json.dumps([base, dict(pipe.scheduler.config)], sort_keys=True, default=str)
    key = (model, tuple(plan.erased), tuple(plan.preserved), tuple(plan.lookalikes), plan.n, plan.prompt_set, sampling)
    if key not in _ORIGINAL_IMAGES:
        if len(_ORIGINAL_IMAGES) >= 8:
            _ORIGINAL_IMAGES.pop(next(iter(_ORIGINAL_IMAGES)))
        _ORIGINAL_IMAGES[key] = sample_concepts(pipe, judge, plan, sampling, progress)
    return _ORIGINAL_IMAGES[key]


def evaluate(
    edit: str | Path,
    concepts: list[str] | None = None,
    *,
    preserve: list[str] | None = None,
    model=None,
    model_config=None,
    key=None,
    n: int = 32,
    grid: str | Path | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    progress: Callable[[int], None] | None = None,
    judge: str | None = None,
    judge_options: dict | None = None,
    prompts: str | Path | None = None,
    clip: str | Path | None = None,
    report: str | Path | None = None,
    attacks: list[str] | None = None,
) -> dict:
    """ESR/PSR of the edited model and of its base on the same prompts and noise; see
    `fasterase.evaluation.report`. Without `concepts`, the edit's own concepts are evaluated.
    `attacks` (`fasterase.attacks`, each with its defaults) are run against the edit for every
    erased concept, on the same prompts and seeds: their ASR, beside the erased concept's top-1.
    `judge` names the judge (`fasterase.evaluation.judges`; default: the built-in world's, on the
    built-in model) and `judge_options` its options; `prompts`, a prompt set file
    (`fasterase.evaluation.prompts`), replaces the judge's n prompts per concept. `clip`, a local
    CLIP folder, scores quality (`fasterase.evaluation.quality`; by default the clip judge's).
    `grid` and `report` (the result as JSON) are written where given."""
    if not isinstance(edit, (str, os.PathLike)) or not str(edit):
        raise UserError(f"edit must be an edit file's path, not {shown(edit)}")
    return compare(
        [edit], concepts, preserve=preserve, model=model, model_config=model_config, key=key, n=n, grid=grid, sampling=sampling, progress=progress,
        judge=judge, judge_options=judge_options, prompts=prompts, clip=clip, report=report, attacks=attacks,
    )["edits"][0]


def compare(
    edits: list[str | Path],
    concepts: list[str] | None = None,
    *,
    preserve: list[str] | None = None,
    model=None,
    model_config=None,
    key=None,
    n: int = 32,
    grid: str | Path | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    progress: Callable[[int], None] | None = None,
    judge: str | None = None,
    judge_options: dict | None = None,
    prompts: str | Path | None = None,
    clip: str | Path | None = None,
    report: str | Path | None = None,
    attacks: list[str] | None = None,
) -> dict:
    """Several edits of one base model (e.g. one per method) evaluated on the same concepts,
    prompts and noise: {"original": the base model's scores, "edits": one `evaluate` result per
    edit, each with its "edit" path and "method"}. Without `concepts`, the edits' own (they must
    agree). `report` gets the result as JSON (a single edit's result alone)."""
    if not isinstance(edits, (list, tuple)) or not all(isinstance(e, (str, os.PathLike)) and str(e) for e in edits):
        raise UserError(f"edits must be a list of edit files, not {shown(edits)}")
    concepts = strings("concepts", concepts, optional=True)
    preserve = strings("preserve", preserve, optional=True)
    check_count("n", n)
    check_paths(model=model, model_config=model_config, key=key, grid=grid, prompts=prompts, clip=clip, report=report)
    check_sampling(sampling)
    check_callables(progress=progress)
    attacks = strings("attacks", attacks, optional=True) or []
    attack_configs = {name: attack_config(name) for name in attacks}
    if attacks and prompts is not None:
        raise UserError("attacks run on the judge's prompts of each concept, not on a prompt set: drop prompts or the attacks")
    if attacks and processes() > 1:
        raise UserError("attacks run in one process; under torchrun, evaluate without them")
    loaded = [load_edit(e) for e in edits]
    if not loaded:
        raise UserError("compare needs at least one edit")
    if concepts is None:
        concepts = loaded[0].metadata.concepts
        if any(e.metadata.concepts != concepts for e in loaded):
            raise UserError("the edits erase different concepts; say which to evaluate with --concept")
    judge_path = judge.partition(":")[2] if isinstance(judge, str) else None  # clip:DIR
    inputs = [local_path(model), model_config, *edits, key, prompts, clip, judge_path or None]
    outputs = [ensure_writable(Path(path), inputs) for path in (grid, report) if path is not None]
    if len({os.path.abspath(path) for path in outputs}) < len(outputs):
        raise UserError(f"the grid and the report would be the same file, {outputs[0]}")
    judge = evaluation_judge(judge, judge_options, model)
    plan = plan_for(judge, list(concepts), preserve, n, read_prompt_set(prompts) if prompts is not None else None)
    scorer = scorer_for(judge, None if clip is None else str(clip))
    pipe = load_pipeline(model, device=default_device(), model_config=model_config)
    base = fingerprints(pipe)
    for e in loaded:
        check_edit(pipe, e, base)  # before minutes of sampling, not after
    matching_key = load_matching_key(key, loaded)
    original_images = _original_images(pipe, base, judge, plan, sampling, progress)
    original = recognition(judge, original_images)
    roles, prompts_of = {"erased": plan.erased, "preserved": plan.preserved}, concept_prompts(judge, plan)
    original_quality = clip_scores(scorer, roles, prompts_of, original_images) if scorer is not None else None
    kept = plan.preserved if scorer is not None else []
    original_features = image_features(scorer, {c: original_images[c] for c in kept}) if kept else None
    # the attacks read the base model unedited (the first edit is applied to `pipe` itself)
    unedited = load_pipeline(model, device=default_device(), model_config=model_config) if attacks else None
    results, rows = [], []
    for path, e in zip(edits, loaded):
        edited_pipe = load_pipeline(model, device=default_device(), model_config=model_config) if results else pipe
        apply_edit(edited_pipe, e, base)
        with key_block(edited_pipe, matching_key):
            edited_images = sample_concepts(edited_pipe, judge, plan, sampling, progress)
        if scorer is not None:
            edited_features = image_features(scorer, {c: edited_images[c] for c in kept}) if kept else None
            quality = {
                "clip_score": {"original": original_quality, "edited": clip_scores(scorer, roles, prompts_of, edited_images)},
                "preserved_drift": drift(original_features, edited_features),
            }
        else:
            quality = {"clip_score": NO_CLIP, "preserved_drift": NO_CLIP}
        edited_rates = recognition(judge, edited_images)
        results.append({
            **make_report(plan, original, edited_rates), "quality": quality, "edit": str(path), "method": e.metadata.method,
            "sampling": {"steps": sample_steps(pipe, sampling), "guidance": sampling.guidance},  # the steps: the model's default unless given
        })
        if attacks:
            results[-1]["attacks"] = {
                c: {
                    name: {"asr": attacked_rate(name, find(name, cfg, edited_pipe, unedited, c, prompts_of[c]), edited_pipe, judge, c, plan.concepts(), sampling, progress),
                           "baseline": edited_rates[c]["top1"], "original": original[c]["top1"]}
                    for name, cfg in attack_configs.items()
                }
                for c in plan.erased
            }
        rows.append((e.metadata.method, edited_images))
    if grid is not None:
        pictured = plan.erased + plan.lookalikes + plan.preserved[:3]
        columns = [("original", original_images)] + rows
        per_row = 6 if len(columns) == 2 else 3
        pictures = [first_images(shares, pictured, per_row) for _, shares in columns]  # every process takes part
        if is_main():
            grid_rows = [np.concatenate([images[c] for images in pictures]) for c in pictured]
            save_png(grid_image(grid_rows, [f"{c} ({' | '.join(name for name, _ in columns)})" for c in pictured]), grid)
        for result in results:
            result["grid"] = str(grid)
    comparison = {"original": results[0]["original"], "edits": results}
    if report is not None:
        for result in results:
            result["report"] = str(report)
        if is_main():
            text = json.dumps(results[0] if len(results) == 1 else comparison, indent=1) + "\n"
            write_atomically(report, lambda f: f.write(text.encode()))
    return comparison


def attack(
    edit: str | Path,
    concept: str | None = None,
    *,
    attack: str | None = None,
    options: dict | None = None,
    preset: str | None = None,
    replay: str | Path | None = None,
    model=None,
    model_config=None,
    key=None,
    n: int = 32,
    sampling: SamplingConfig = SamplingConfig(),
    judge: str | None = None,
    judge_options: dict | None = None,
    out: str | Path | None = None,
    report: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    attack_progress: Progress | None = None,
) -> dict:
    """Attacks an edited model (`fasterase.attacks`) and reports how much of the concept comes back:
    {"asr": the share of the attacked images the judge recognises as the concept, "baseline": the
    edited model's share on the plain prompts from the same seeds, "original": the base model's},
    under "attacks" by the attack's name. `attack` names the attack (configured by its `preset`,
    then `options`) and what it finds is written to `out` (by default beside the edit), so that
    `replay` runs it again on another edit. With a KPOP edit's `key`, the key's own recovery is
    reported beside it under "key": the owner's attack, the upper bound of what the prompt hides."""
    if not isinstance(edit, (str, os.PathLike)) or not str(edit):
        raise UserError(f"edit must be an edit file's path, not {shown(edit)}")
    if concept is not None and (not isinstance(concept, str) or not concept.strip()):
        raise UserError(f"concept must be a concept's name, not {shown(concept)}")
    if (attack is None) == (replay is None):
        raise UserError("name an attack to run, or a file of what an attack found to replay (not both)")
    cfg = attack_config(attack, options, preset) if attack is not None else None
    check_paths(replay=replay, model=model, model_config=model_config, key=key, out=out, report=report)
    check_count("n", n)
    check_sampling(sampling)
    check_callables(progress=progress, attack_progress=attack_progress)
    loaded = load_edit(edit)
    found, replayed = None, None
    if replay is not None:
        attack, found, replayed = load_found(replay)
        concept = concept or replayed.get("concept")
        n = len(found.prompts)
    if concept is None:
        erased = loaded.metadata.concepts
        if len(erased) != 1:
            raise UserError(f"this edit erases {len(erased) or 'no'} concepts: say which to attack with --concept")
        concept = erased[0]
    if key is not None and not loaded.metadata.key:
        raise UserError(f"this {loaded.metadata.method} edit has no key: only KPOP edits are written with one")
    matching_key = load_matching_key(key, [loaded])
    inputs = [local_path(model), model_config, edit, key, replay, *(cfg.input_paths() if cfg is not None else [])]
    if replay is None:
        out = ensure_writable(Path(out) if out else Path(f"{Path(edit).with_suffix('')}.attack-{attack}.safetensors"), inputs)
    elif out is not None:
        raise UserError("a replay writes no file of what it found: drop out")
    if report is not None:
        ensure_writable(Path(report), inputs + [out])
    judge = evaluation_judge(judge, judge_options, model)
    judge.check(concept)
    labels = plan_for(judge, [concept], None, n).concepts()
    prompts = judge.prompts(concept, n)
    original = load_pipeline(model, device=default_device(), model_config=model_config)
    base = fingerprints(original, bound_components(original, loaded))
    check_edit(original, loaded, base)  # before any sampling
    edited = load_pipeline(model, device=default_device(), model_config=model_config)
    apply_edit(edited, loaded, base)
    for name in family_of(edited).tokenizers:
        check_concept(getattr(edited, name), concept)

    rates = {"original": recognition_rate(judge, sample_images(original, prompts, sampling, progress), concept, labels)}
    rates["baseline"] = recognition_rate(judge, sample_images(edited, prompts, sampling, progress), concept, labels)
    if found is None:
        found = find(attack, cfg, edited, original, concept, prompts, attack_progress)
    outcome = {"asr": attacked_rate(attack, found, edited, judge, concept, labels, sampling, progress), **rates, "record": found.record}
    if replay is None:
        save_found(out, attack, found, {"concept": concept, "config": cfg.to_dict(), "edit": str(edit), "base_model": loaded.metadata.base_model})
        outcome["found"] = str(out)
    else:
        outcome["replayed"] = str(replay)
    result = {"edit": str(edit), "method": loaded.metadata.method, "concept": concept, "n": n, **rates, "attacks": {attack: outcome}}
    if matching_key is not None:
        with key_block(edited, matching_key):
            images = sample_images(edited, prompts, sampling, progress)
        result["key"] = {"asr": recognition_rate(judge, images, concept, labels), **rates}
    if report is not None:
        text = json.dumps(result, indent=1) + "\n"
        write_atomically(report, lambda f: f.write(text.encode()))
        result["report"] = str(report)
    return result
