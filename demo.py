"""The whole LaCLIP pipeline end to end on a laptop CPU, in a few minutes, with nothing to download.

    python demo.py [--out demo_out]

1. makes a tiny LLaMA in Meta's format (params.json, consolidated.00.pth + .01.pth,
   tokenizer.model), trained for a few hundred steps on the project's example pools so that it
   has learned the ``source => target`` line format; its rewrites are NOT LLaMA-quality;
2. rewrites rewrite/text/source.txt with ``torchrun --nproc_per_node 2 rewrite/llama_rewrite.py``
   (model parallel over 2 CPU processes), once per sample mode;
3. draws a small image-caption set that uses those captions and rewrites, and trains the tiny
   CLIP preset with ``train.py --aug-text``;
4. runs ``eval_zeroshot_imagenet.py`` on a drawn ImageFolder with WordNet-ID class folders;
5. prints what each step produced and where the files are.

Every step calls the real entry point in a subprocess. A finished step is reused on a re-run.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rewrite.prompts import load_pool
from testkit.net import free_port
from testkit.tiny_llama import train_tiny_llama

ROOT = Path(__file__).resolve().parent

MODES = ("chatgpt", "bard", "mscoco", "human")
# Five ImageNet classes (WordNet IDs) for the zero-shot step, each drawn as one colour and shape.
EVAL_CLASSES = {"n01440764": ((200, 120, 40), "ellipse"), "n02123045": ((120, 120, 120), "rectangle"),
                "n03000684": ((220, 30, 30), "polygon"), "n04592741": ((240, 240, 240), "line"),
                "n07747607": ((250, 160, 0), "ellipse")}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LaCLIP end to end on the CPU: rewrite, train, evaluate.")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo makes (default demo_out/)")
    p.add_argument("--lines", type=int, default=100, help="captions of rewrite/text/source.txt to use (max 100)")
    p.add_argument("--llama-steps", type=int, default=800, help="training steps of the tiny LLaMA")
    p.add_argument("--epochs", type=int, default=3, help="CLIP training epochs")
    p.add_argument("--eval-images", type=int, default=8, help="images per class in the zero-shot set")
    p.add_argument("--seed", type=int, default=0)
    return p


class Step:
    """A pipeline step whose outputs are reused when a stamp with the same settings exists."""

    def __init__(self, out: Path, name: str, settings: dict):
        self.stamp = out / ".steps" / f"{name}.json"
        self.name = name
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def done(self) -> bool:
        return self.stamp.is_file() and json.loads(self.stamp.read_text()).get("key") == self.key

    def finish(self) -> None:
        self.stamp.parent.mkdir(parents=True, exist_ok=True)
        self.stamp.write_text(json.dumps({"key": self.key, "finished": time.ctime()}))


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(cmd: list[str], log: Path) -> None:
    """Run an entry point, showing its output live; stop the demo with the command if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            f.write(line)
            sys.stdout.write("  | " + line)
        code = proc.wait()
    if code != 0:
        sys.exit(f"demo: step failed (exit {code}): {' '.join(cmd)}\nfull log: {log}")


def torchrun() -> list[str]:
    """The torchrun launcher of this Python's environment (same program as -m torch.distributed.run)."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def pool_pairs() -> list[tuple[str, str]]:
    """All (source, target) pairs of the shipped pools; an MSCOCO group gives consecutive pairs."""
    pairs = []
    for mode in MODES:
        pool = load_pool(mode)
        pairs += list(pool.pairs)
        pairs += [(g[i], g[i + 1]) for g in pool.groups for i in range(len(g) - 1)]
    return pairs


def make_llama(out: Path, args) -> Path:
    ckpt = out / "llama" / "tiny"
    step = Step(out, "llama", {"steps": args.llama_steps, "seed": args.seed})
    banner("1/4 tiny LLaMA in Meta's format (trained on the example pools; not LLaMA-quality)")
    if step.done():
        print(f"reusing {ckpt}")
        return ckpt
    train_tiny_llama(ckpt, pool_pairs(), steps=args.llama_steps, seed=args.seed, mp=2, log=print)
    step.finish()
    print("wrote " + ", ".join(sorted(p.name for p in ckpt.iterdir())))
    return ckpt


def rewrite_captions(out: Path, ckpt: Path, source: Path, args) -> dict[str, Path]:
    banner("2/4 rewriting captions with torchrun --nproc_per_node 2 (model parallel over 2 CPU processes)")
    outputs = {}
    for mode in MODES:
        target = out / "rewrites" / f"source_{mode}.txt"
        outputs[mode] = target
        step = Step(out, f"rewrite_{mode}", {"source": source.read_text(), "seed": args.seed,
                                             "llama_steps": args.llama_steps})
        if step.done():
            print(f"reusing {target}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        run([*torchrun(), "--nproc_per_node", "2",
             "--master_port", str(free_port()), "rewrite/llama_rewrite.py",
             "--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model"),
             "--max_batch_size", "32", "--max_seq_len", "400", "--prompt_filename", str(source),
             "--output_filename", str(target), "--sample_mode", mode, "--temperature", "0.9",
             "--seed", str(args.seed), "--overwrite"], out / "logs" / f"rewrite_{mode}.log")
        step.finish()
    return outputs


def draw(path: Path, seed: int, colour=None, shape=None) -> None:
    """A 96x96 picture of a few random shapes (or one given colour/shape, for the eval classes)."""
    import random

    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    img = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
    pen = ImageDraw.Draw(img)
    for _ in range(3 if shape is None else 2):
        fill = colour or tuple(rng.randrange(256) for _ in range(3))
        kind = shape or rng.choice(["ellipse", "rectangle", "polygon", "line"])
        x0, y0 = rng.randrange(0, 50), rng.randrange(0, 50)
        box = [x0, y0, x0 + rng.randrange(20, 46), y0 + rng.randrange(20, 46)]
        if kind == "polygon":
            pen.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
        elif kind == "line":
            pen.line(box, fill=fill, width=6)
        else:
            getattr(pen, kind)(box, fill=fill)
    img.save(path)


def make_datasets(out: Path, captions: list[str], args) -> tuple[Path, Path]:
    """train.csv + drawn images (one per caption), and imagenet/val/<wnid>/*.png."""
    data = out / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    with open(data / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "caption"])
        for k, caption in enumerate(captions):
            draw(data / "images" / f"{k:05d}.jpg", seed=args.seed * 100003 + k)
            writer.writerow([f"images/{k:05d}.jpg", caption])
    for c, (wnid, (colour, shape)) in enumerate(EVAL_CLASSES.items()):
        folder = out / "imagenet" / "val" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.eval_images):
            draw(folder / f"{wnid}_{i:03d}.png", seed=7919 * (c + 1) + i, colour=colour, shape=shape)
    return data, out / "imagenet"


def train_clip(out: Path, data: Path, imagenet: Path, rewrites: dict[str, Path], captions: list[str], args) -> Path:
    banner("3/4 training the tiny CLIP with train.py --aug-text (original caption or one of its 4 rewrites)")
    run_dir = out / "train"
    step = Step(out, "train", {"epochs": args.epochs, "seed": args.seed,
                               "rewrites": [p.read_text() for p in rewrites.values()]})
    if step.done():
        print(f"reusing {run_dir}")
        return run_dir
    if run_dir.exists():  # a stale run of other settings would otherwise be resumed
        for name in ("checkpoint.pt", "checkpoint_best.pt", "log.txt"):
            (run_dir / name).unlink(missing_ok=True)
    run([sys.executable, "train.py", "--train-data", str(data / "train.csv"), "--root", str(data),
         "--aug-text", "--augmented_caption_filelist", *map(str, rewrites.values()),
         "--imagenet-root", str(imagenet), "--output-dir", str(run_dir), "--model", "CLIP_TINY",
         "--epochs", str(args.epochs), "--warmup-epochs", "1", "--batch-size", str(min(16, len(captions) // 2)),
         "--lr", "1e-3",
         "--workers", "0", "--seed", str(args.seed), "--eval-batch-size", "32"], out / "logs" / "train.log")
    step.finish()
    return run_dir


def evaluate(out: Path, imagenet: Path, run_dir: Path) -> str:
    banner("4/4 zero-shot evaluation with eval_zeroshot_imagenet.py on WordNet-ID class folders")
    log = out / "logs" / "eval.log"
    run([sys.executable, "eval_zeroshot_imagenet.py", "--imagenet-root", str(imagenet),
         "--ckpt-path", str(run_dir / "checkpoint_best.pt"), "--model", "CLIP_TINY", "--batch-size", "32",
         "--workers", "0", "--output-json", str(out / "zeroshot.json")], log)
    lines = [line for line in log.read_text().splitlines() if line.startswith("ImageNet zero-shot accuracy")]
    return lines[-1] if lines else "(no accuracy line)"


def summary(out: Path, captions: list[str], rewrites: dict[str, Path], run_dir: Path, accuracy: str) -> None:
    banner("what the demo produced")
    rows = {mode: path.read_text(encoding="utf-8").split("\n") for mode, path in rewrites.items()}
    for k in range(min(3, len(captions))):
        print(f"original: {captions[k]}")
        for mode in MODES:
            print(f"  {mode:>8}: {rows[mode][k]}")
    epochs = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if line.strip()]
    losses = ", ".join(f"{e.get('train_loss', float('nan')):.4f}" for e in epochs)
    print(f"\nCLIP training loss per epoch: {losses}")
    print(accuracy + "   (random-looking on drawn shapes: the point is that every step runs)")
    print("\nNote: the tiny LLaMA was trained for seconds on a few dozen example pairs; its rewrites show the")
    print("mechanics (prompting, model parallelism, alignment), not LLaMA-quality language.")
    print(f"\nfiles: tiny LLaMA {out / 'llama' / 'tiny'}\n       rewrites {out / 'rewrites'}\n"
          f"       training data {out / 'data'}\n       checkpoints and log.txt {run_dir}\n"
          f"       zero-shot results {out / 'zeroshot.json'}\n       logs {out / 'logs'}")


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if not 4 <= args.lines <= 100:
        sys.exit(f"demo: --lines must be between 4 and 100, got {args.lines}")
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    captions = (ROOT / "rewrite" / "text" / "source.txt").read_text(encoding="utf-8").splitlines()[: args.lines]
    source = out / "source.txt"
    source.write_text("\n".join(captions) + "\n", encoding="utf-8")
    ckpt = make_llama(out, args)
    rewrites = rewrite_captions(out, ckpt, source, args)
    data, imagenet = make_datasets(out, captions, args)
    run_dir = train_clip(out, data, imagenet, rewrites, captions, args)
    accuracy = evaluate(out, imagenet, run_dir)
    summary(out, captions, rewrites, run_dir, accuracy)
    print(f"\ndemo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
