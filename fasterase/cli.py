"""`fasterase erase / generate / evaluate / env / cache / toyworld`: parses, runs, prints one-line errors.

A UserError (bad input) prints `fasterase: error: ...` and exits 2 with no traceback. Reporting
commands take --json and then print exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from .errors import UserError, printable, reading_text


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line error and exit status as any other bad input."""

    def error(self, message: str):
        command = self.prog.removeprefix("fasterase").strip()
        print(f"fasterase: error: {command + ': ' if command else ''}{message}", file=sys.stderr)
        sys.exit(2)


def _reports() -> bool:
    """Whether this process prints: under torchrun every process runs the command and rank 0
    alone reports (read from the environment: no torch import before the input is checked)."""
    return os.environ.get("RANK", "0") == "0"


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, disable=not _reports())


def _parse_set(item: str) -> tuple[str, object]:
    """"lr=1e-5" -> ("lr", 1e-05): the value is read as YAML, so numbers, lists and booleans work."""
    import yaml

    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise UserError(f"--set takes OPTION=VALUE, not {item!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise UserError(f"--set {name}: {value!r} is not a valid value") from exc
    if isinstance(parsed, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return name.strip(), parsed


def _cmd_erase(args) -> int:
    from .methods import erase_config

    bar = None

    def progress(step: int, total: int, losses: dict[str, float]) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress_bar(total, f"{args.method}")
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})

    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else None
    flags = {
        "preserve": args.preserve, "steps": args.steps, "seed": args.seed, "backend": args.backend, "dtype": dtype,
        "images": args.images, "masks": args.masks,
    }
    options = dict(_parse_set(item) for item in args.set) | {k: v for k, v in flags.items() if v is not None}
    # The whole config is checked before torch is imported; api.erase builds it again from the same arguments.
    erase_config(args.method, args.concept, config=args.config, preset=args.preset, **options)
    from . import api

    try:
        summary = api.erase(
            args.method, args.concept, model=args.model, model_config=args.model_config, out=args.out, config=args.config, preset=args.preset,
            progress=progress, notify=lambda line: print(f"fasterase: {line}", file=sys.stderr), **options,
        )
    finally:
        if bar is not None:
            bar.close()
    facts = {
        "edit": str(summary.edit), "key": str(summary.key) if summary.key else None, "seconds": round(summary.seconds, 2),
        "peak_memory_mb": round(summary.peak_memory_bytes / 2**20, 1), "device": summary.device,
        "loras": [str(p) for p in summary.loras],
    }
    if args.json:
        print(json.dumps(facts))
    else:
        print(f"erased {', '.join(args.concept or [])} with {args.method} in {facts['seconds']:.1f} s on {facts['device']}, peak memory {facts['peak_memory_mb']:.0f} MB")
        print(f"edit: {summary.edit}")
        if summary.key:
            print(f"key (keep it private; it recovers the concept): {summary.key}")
        for lora in summary.loras:
            print(f"lora: {lora}")
    return 0


def _sampling(args):
    """The sampling options of generate, evaluate and toyworld report, checked (as --n is) before
    torch is imported."""
    from .config import SamplingConfig, check_count

    check_count("n", args.n)
    return SamplingConfig(steps=args.sample_steps, guidance=args.guidance, batch_size=args.sample_batch, seed=args.seed)


def _cmd_generate(args) -> int:
    sampling = _sampling(args)
    from . import api

    path = api.generate(
        args.prompt, model=args.model, model_config=args.model_config, edit=args.edit, key=args.key, n=args.n, out=args.out, sampling=sampling,
    )
    print(json.dumps({"grid": str(path)}) if args.json else f"wrote {path}")
    return 0


def _read_lines(path: str, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; a one-line UserError if there are none."""
    with reading_text(path):
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path} has no {what} (one a line)")
    return lines


def _cmd_evaluate(args) -> int:
    sampling = _sampling(args)
    judge_options = dict(_parse_set(item) for item in args.judge_set)
    if args.candidates:
        judge_options["candidates"] = _read_lines(args.candidates, "candidate labels")
    from .attacks import attack_config

    for name in args.attack or []:
        attack_config(name)  # before torch is imported
    from . import api
    from .evaluation.report import format_comparison, format_table

    from tqdm import tqdm

    grid = args.grid or str(Path(args.edit[0]).with_suffix("")) + ".eval.png"
    report = args.report or str(Path(grid).with_suffix(".json"))
    if args.candidates:
        for path in (grid, report):
            api.ensure_writable(Path(path), [args.candidates])  # the API sees the labels, not their file
    bar = None

    def progress(images: int) -> None:
        # images drawn, by the base model and each edit (under torchrun, rank 0 shows its own);
        # the bar starts with the first image, so that bad input still gets one line
        nonlocal bar
        if bar is None:
            bar = tqdm(desc="evaluate", unit="img", file=sys.stderr, dynamic_ncols=True, disable=not _reports())
        bar.update(images)

    try:
        comparison = api.compare(
            args.edit, args.concept, preserve=args.preserve, model=args.model, model_config=args.model_config, key=args.key, n=args.n, grid=grid,
            sampling=sampling, judge=args.judge, judge_options=judge_options, prompts=args.prompts, clip=args.clip, progress=progress,
            report=report, attacks=args.attack,
        )
    finally:
        if bar is not None:
            bar.close()
    single = len(args.edit) == 1
    if args.json:
        print(json.dumps(comparison["edits"][0] if single else comparison))
    else:
        print(format_table(comparison["edits"][0]) if single else format_comparison(comparison))
        print(f"grid: {grid}\nreport: {report}")
    return 0


def _cmd_attack(args) -> int:
    sampling = _sampling(args)
    options = dict(_parse_set(item) for item in args.set)
    judge_options = dict(_parse_set(item) for item in args.judge_set)
    if args.candidates:
        judge_options["candidates"] = _read_lines(args.candidates, "candidate labels")
    if args.attack is not None:
        from .attacks import attack_config

        attack_config(args.attack, options, args.preset)  # checked whole before torch is imported
    from . import api

    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    # each bar starts with its first update, so that bad input still gets one line
    def images(count: int) -> None:
        if "images" not in bars:
            bars["images"] = tqdm(desc="images", unit="img", file=sys.stderr, dynamic_ncols=True)
        bars["images"].update(count)

    def steps(step: int, total: int, losses: dict[str, float]) -> None:
        if "attack" not in bars:
            bars["attack"] = tqdm(desc=args.attack, total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
        bar = bars["attack"]
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)

    try:
        result = api.attack(
            args.edit, args.concept, attack=args.attack, options=options, preset=args.preset, replay=args.replay, model=args.model,
            model_config=args.model_config, key=args.key, n=args.n, sampling=sampling, judge=args.judge, judge_options=judge_options,
            out=args.out, report=args.report, progress=images, attack_progress=steps,
        )
    finally:
        for bar in bars.values():
            bar.close()
    if args.json:
        print(json.dumps(result))
        return 0
    from .evaluation.report import format_attacks

    print(format_attacks(result))
    for outcome in result["attacks"].values():
        if "found" in outcome:
            print(f"found: {outcome['found']}")
    return 0


def _cmd_env(args) -> int:
    import platform

    import torch

    from .kernels import backend_status

    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": backend_status(),
    }
    for name in ("triton", "diffusers", "transformers", "peft", "safetensors"):
        try:
            facts[name] = __import__(name).__version__
        except ImportError:
            facts[name] = None
    if args.json:
        print(json.dumps(facts))
        return 0
    for key, value in facts.items():
        if key != "backends":
            print(f"{key:13}{value}")
    for op, backends in facts["backends"].items():
        for backend, status in backends.items():
            print(f"{op} [{backend}]: {status}")
    return 0


def _cmd_cache_build(args) -> int:
    from tqdm import tqdm

    from .api import default_device, ensure_writable
    from .closed_form import preservation_gram, save_gram
    from .models.loading import load_pipeline, local_path, model_name

    out = ensure_writable(Path(args.out), [args.prompts, local_path(args.model), args.model_config])
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    prompts = Path(args.prompts)

    def captions():
        # one caption per line; blank lines are not captions
        with open(prompts, encoding="utf-8") as lines:
            yield from (line.strip() for line in lines if line.strip())

    with reading_text(prompts):
        count = sum(1 for _ in captions())  # for the progress bar; the captions are read again below
    if not count:
        raise UserError(f"{prompts} has no captions (one per line)")
    start = time.time()
    pipe = load_pipeline(args.model, device=default_device(), model_config=args.model_config)
    with tqdm(total=count, desc="cache build", unit="prompt", file=sys.stderr, dynamic_ncols=True) as bar:
        cache = preservation_gram(pipe, captions(), model_name(args.model), args.batch_size, bar.update)
    save_gram(out, cache)
    facts = {"gram": str(out), "prompts": cache.prompts, "tokens": cache.tokens, "text_encoder": cache.text_encoder, "seconds": round(time.time() - start, 2)}
    print(json.dumps(facts) if args.json else f"wrote the Gram of {cache.prompts} prompts ({cache.tokens} token embeddings) in {facts['seconds']:.1f} s: {out}")
    return 0


def _cmd_toyworld_build(args) -> int:
    from .toyworld.recipe import BuildConfig, build

    start = time.time()
    record = build(Path(args.out), BuildConfig(seed=args.seed, reuse_from=args.reuse_from or ""), log=lambda line: print(line, file=sys.stderr))
    record["total_seconds"] = time.time() - start
    print(json.dumps(record) if args.json else f"built the world in {record['total_seconds']:.0f} s on {record['device']}: {args.out}")
    return 0


def _cmd_toyworld_report(args) -> int:
    sampling = _sampling(args)
    from .toyworld.report import format_report, world_report

    result = world_report(model=args.model, n=args.n, sampling=sampling)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _cmd_toyworld_images(args) -> int:
    from .toyworld.folders import write_concept_folder

    paths = write_concept_folder(args.concept, args.out, args.masks, count=args.n, seed=args.seed)
    facts = {"images": [str(p) for p in paths], "masks": args.masks}
    print(json.dumps(facts) if args.json else f"wrote {len(paths)} images of {args.concept} to {args.out}" + (f", masks to {args.masks}" if args.masks else ""))
    return 0


EVALUATE_EXAMPLES = """\
examples, one per judge:
  # the built-in model, judged by its own classifier (--judge world)
  fasterase evaluate --edit circle.safetensors
  # your model, judged by a local CLIP over Imagenette's ten classes (one a line)
  fasterase evaluate --model ./sd15 --edit church.safetensors --judge clip:./clip-vit-large-patch14 --candidates imagenette.txt
  # nudity (pip install 'fasterase[eval]'): the nudity rate before and after
  fasterase evaluate --model ./sd15 --edit nudity.safetensors --judge nudenet --judge-set threshold=0.6
  # a judge of your own: a class with check, prompts, recognised, siblings and lookalike
  PYTHONPATH=. fasterase evaluate --model ./sd15 --edit van-gogh.safetensors --judge my_judges:StyleJudge
"""


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-steps", type=int, default=0, help="denoising steps per image (default: the model's, 10 on the built-in world and 25 on others)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--sample-batch", type=int, default=0, help="prompts drawn at a time (default 0: by image size, 64 at 256 px, 4 at 1024 px)")
    p.add_argument("--seed", type=int, default=0)


def _judge_options(p) -> None:
    """The judge options of evaluate and attack."""
    p.add_argument("--judge", help="what recognises the concepts: world (the built-in classifier; the default on the built-in model), clip:DIR (a local CLIP folder), nudenet, or module:Class of your own")
    p.add_argument("--candidates", metavar="FILE", help="labels the clip judge ranks besides the evaluated concepts, one a line (e.g. Imagenette's ten classes)")
    p.add_argument("--judge-set", action="append", default=[], metavar="OPTION=VALUE", help="any judge option (value read as YAML), e.g. --judge-set threshold=0.5")


def build_parser() -> argparse.ArgumentParser:
    from .attacks import ATTACK_CONFIGS
    from .methods import CONFIGS
    from .names import BACKEND_NAMES

    parser = _Parser(prog="fasterase", description="Erase concepts from text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "a diffusers folder (SD1.x, SD2.x or SDXL base), a single-file .safetensors checkpoint or a hub id (default: the built-in world)"
    model_config_help = "with a single-file --model: a local diffusers folder of the same family whose configs and tokenizers it uses (offline)"

    p = sub.add_parser("erase", help="erase concepts and write an edit")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(sorted(CONFIGS))}")
    p.add_argument("--concept", action="append", help="a concept to erase (repeat for several)")
    p.add_argument("--preserve", action="append", help="a concept to keep (repeat for several)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--model-config", metavar="DIR", help=model_config_help)
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="load the frozen weights and compute in float16 on a GPU (a CPU runs float32)")
    precision.add_argument("--bf16", action="store_true", help="load the frozen weights and compute in bfloat16 on a GPU (a CPU runs float32)")
    p.add_argument("--steps", type=int, help="training steps (default: the method's)")
    p.add_argument("--config", help="a YAML file of method options")
    p.add_argument("--preset", help="a packaged preset, e.g. sd14 (the paper's settings)")
    p.add_argument("--backend", choices=("auto", *BACKEND_NAMES), help="kernel backend (default auto: the fastest that runs here); ops not written in a forced backend run torch")
    p.add_argument("--seed", type=int)
    p.add_argument("--images", help="a folder of the concept's images (methods that learn from images; default: sampled from the model)")
    p.add_argument("--masks", help="a folder of masks named like the images (white: the concept), attention (from the model's own cross-attention; MACE's default) or none")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="any method option (value read as YAML), e.g. --set lr=1e-5")
    p.add_argument("--out", help="the edit file to write (default: METHOD-CONCEPTS.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_cmd_erase)

    p = sub.add_parser("generate", help="sample an image grid, optionally from an edited model")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several rows)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--model-config", metavar="DIR", help=model_config_help)
    p.add_argument("--edit", help="an edit file to apply")
    p.add_argument("--key", help="a key file (KPOP) that recovers the erased concepts")
    # --count, because torchrun reads a bare --n as an abbreviation of its own options
    p.add_argument("--n", "--count", dest="n", type=int, default=8, help="images per prompt")
    p.add_argument("--out", default="grid.png", help="the PNG to write")
    _sampling_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_generate)

    p = sub.add_parser("evaluate", help="ESR/PSR of edits against their base model", epilog=EVALUATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edit", action="append", required=True, help="an edit file (repeat to compare several, e.g. one per method)")
    p.add_argument("--concept", action="append", help="erased concept (default: the edit's)")
    p.add_argument("--preserve", action="append", help="preserved concept (default: the rest of the erased concept's family)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--model-config", metavar="DIR", help=model_config_help)
    p.add_argument("--key", help="evaluate with a KPOP key in place")
    p.add_argument("--n", "--count", dest="n", type=int, default=32, help="images per concept")
    p.add_argument("--grid", help="before/after PNG (default: beside the edit)")
    p.add_argument("--report", metavar="FILE", help="the report as JSON (default: beside the grid, FILE.json)")
    _judge_options(p)
    p.add_argument("--clip", metavar="DIR", help="a local CLIP folder that scores quality (CLIP score of erased and preserved images, before and after); default: the clip judge's")
    p.add_argument("--prompts", metavar="FILE", help="a prompt set: .csv with a prompt column and optional seed, guidance, concept (as I2P publishes it), or text, one prompt a line; one image per prompt instead of --n per concept")
    p.add_argument("--attack", action="append", help=f"also attack the edit (repeat for several; each with its defaults; `fasterase attack` configures one): {', '.join(sorted(ATTACK_CONFIGS))}")
    _sampling_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser("attack", help="attack an edited model: how much of the erased concept comes back (ASR)")
    p.add_argument("--edit", required=True, help="the edit file to attack")
    p.add_argument("--concept", help="the erased concept to bring back (default: the edit's, if it erases one)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--attack", help=f"one of: {', '.join(sorted(ATTACK_CONFIGS))}")
    which.add_argument("--replay", metavar="FILE", help="what an attack found (its --out file), run again on this edit")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="any attack option (value read as YAML), e.g. --set steps=500")
    p.add_argument("--preset", help="a packaged preset of the attack, e.g. paper (the paper's settings)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--model-config", metavar="DIR", help=model_config_help)
    p.add_argument("--key", help="a KPOP edit's key: its own recovery, reported beside the attack")
    p.add_argument("--n", "--count", dest="n", type=int, default=32, help="images of the concept, with and without the attack")
    _judge_options(p)
    p.add_argument("--out", help="the file of what the attack found, to replay (default: beside the edit, EDIT.attack-NAME.safetensors)")
    p.add_argument("--report", metavar="FILE", help="the result as JSON")
    _sampling_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_attack)

    p = sub.add_parser("env", help="versions, the GPU, and each kernel backend's status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_env)

    p = sub.add_parser("cache", help="caches that methods reuse")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    q = cache_sub.add_parser("build", help="the preservation Gram of many captions, for a method's preserve_gram option (UCE, MACE)")
    q.add_argument("--prompts", required=True, help="a text file, one caption per line")
    q.add_argument("--model", help=model_help)
    q.add_argument("--model-config", metavar="DIR", help=model_config_help)
    q.add_argument("--batch-size", type=int, default=256, help="captions encoded at a time")
    q.add_argument("--out", required=True, help="the .safetensors file to write")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_cmd_cache_build)

    p = sub.add_parser("toyworld", help="the built-in world")
    world_sub = p.add_subparsers(dest="toyworld_command", required=True)
    q = world_sub.add_parser("build", help="train the world's model and classifier (uses a GPU if there is one)")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--reuse-from", help="an earlier build folder whose classifier and VAE are reused")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_cmd_toyworld_build)
    q = world_sub.add_parser("report", help="the world's quality bars: classifier accuracy, prompt-following, sampling time")
    q.add_argument("--model", help="a world pipeline folder (default: the packaged one)")
    q.add_argument("--n", type=int, default=32, help="images per shape")
    _sampling_options(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_cmd_toyworld_report)
    q = world_sub.add_parser("images", help="write a concept's procedural images (and exact masks) to folders, for --images/--masks")
    q.add_argument("--concept", required=True)
    q.add_argument("--out", required=True, help="the image folder")
    q.add_argument("--masks", help="the mask folder (same file names)")
    q.add_argument("--n", type=int, default=8, help="images to write")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_cmd_toyworld_images)
    return parser


# the commands whose work torchrun's processes share (`fasterase.distributed`); erase, for the
# methods that share theirs (MACE), which it says itself
SHARED_COMMANDS = ("evaluate", "generate", "erase")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return the status instead of exiting
        return exc.code if isinstance(exc.code, int) else 2
    reporting = _reports()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in SHARED_COMMANDS:
        if reporting:
            shared = ", ".join(SHARED_COMMANDS[:-1]) + " and " + SHARED_COMMANDS[-1]
            print(f"fasterase: error: {args.command} runs in one process; under torchrun, {shared} share their work", file=sys.stderr)
        return 2
    if not reporting:
        sys.stdout = open(os.devnull, "w")
    # SIGTERM unwinds like SIGINT, so that what is half-written (temporary files) is removed.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.run(args)
    except UserError as exc:
        if reporting:
            print(f"fasterase: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fasterase: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("fasterase: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every cleanup on the way out runs."""


def _terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
