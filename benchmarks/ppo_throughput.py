"""PPO throughput: `chatloop ppo` against TRL's RLOOTrainer (trl 1.16) and trl 1.12's experimental PPOTrainer.

    .venv/bin/python benchmarks/ppo_throughput.py --threads 1 --clock cpu   # steadier on a busy machine
    .venv/bin/python benchmarks/ppo_throughput.py                           # torch's default threads, wall clock
    .venv/bin/python benchmarks/ppo_throughput.py --quick                   # smoke run, a few minutes
    .venv/bin/python benchmarks/ppo_throughput.py --precision bf16          # bf16 autocast on every side

Needs TRL (`pip install -e .[bench]`) and, for the PPOTrainer side, trl 1.12.0 unpacked into its own directory
(TRL removed PPOTrainer after 1.12), which only that side's worker puts first on its path:

    .venv/bin/python -m pip install --no-deps --target /work/trl112 trl-1.12.0-py3-none-any.whl
    ... --trl112 /work/trl112   (the default; a missing directory skips that side)

Nothing is downloaded. The point measured (issue 6): episodes/s of one PPO iteration, rollout + scoring +
update, on the same workload. Setup, in the parent process (never timed):

- a small synthetic world (chatloop.world.world) and a byte-level BPE (--vocab tokens) on its pretraining text;
- prompts: the world's user prompts whose chat rendering (our template, generation prompt added) has at least
  --prompt-tokens tokens, cut to their last --prompt-tokens tokens (ours cuts them itself, with
  max_prompt_tokens; TRL gets the cut ids, or for RLOO their text, checked to encode back to the same ids with
  transformers' tokenizer of the checkpoint), so every prompt on every side is exactly that long;
- a policy ("SFT") and a reward model: randomly initialised chatloop GPTs of --preset, saved with
  chatloop.checkpoint.save_model as LlamaForCausalLM / LlamaForSequenceClassification (num_labels = 1)
  directories that every side opens (transformers' Auto classes for TRL).

Every iteration is B = --batch-size episodes of exactly --response-tokens sampled tokens (temperature 1, no
top-k/top-p), then --ppo-epochs passes of --minibatches optimizer steps over them, fp32 (or --precision bf16).
The response length is fixed on every side so that all generate the same number of tokens: ours samples with no
stop token (the wrapper of `generate` below passes an empty stop list, so every response is "truncated" and gets
the fixed no-EOS score; the reward model still runs on every response), the PPOTrainer has no stop token (its
default), and RLOO gets `min_new_tokens = max_new_tokens` (EOS suppressed until the budget is spent).

One worker subprocess per side, each running its real end-to-end training entry point:

- ours: `chatloop.train.ppo.ppo(PPOConfig(...))` itself. Module attributes of chatloop.train.ppo are
  wrapped, observing only (besides the empty stop list): `lr_for` (called at the top of every iteration)
  marks the iteration boundary, `generate` times rollout generation, `make_batch` the whole rollout phase,
  `ppo_update` the optimisation; a forward hook on the reward model times scoring. So the split is:
  generation, scoring, rollout forwards (policy, reference and value log-probs/values, rewards, GAE),
  update (PPO epochs), other (metrics, EMA, logging).
- ours-rloo: the same entry point with --algorithm=rloo and samples_per_prompt = --num-generations (no value
  model): the critic-free side, measured against RLOOTrainer at the same samples per prompt and tokens.
- RLOO (trl 1.16): `RLOOTrainer(...).train()` with the reward model as its reward function, B/G prompts x G
  = --num-generations completions per generation batch, per_device_train_batch_size = B / minibatches,
  steps_per_generation = minibatches, num_iterations = ppo epochs, beta = kl_coef (so the reference model
  runs). A TrainerCallback's on_step_end counts optimizer steps; every minibatches x epochs steps is one
  iteration. Overrides that call TRL's own methods time `_generate` (generation, including TRL's prompt
  tokenization and decoding), `_calculate_rewards` (scoring: decode, re-tokenize, reward model) and the
  no-grad `_get_per_token_logps_and_entropies` calls (old and reference log-probs).
- PPO (trl 1.12, trl.experimental.ppo): `PPOTrainer(...).train()` with separate policy, reference, value
  (initialised from the RM, as ours) and reward models; per_device_train_batch_size = B (one micro-batch per
  minibatch: with gradient accumulation its optimizer would step only every accumulation-th minibatch),
  num_mini_batches, num_ppo_epochs, response_length, stop_token None, num_sample_generations 0. Its
  on_step_end callback (once per iteration) is the boundary; the module functions `batch_generation`,
  `get_reward` and `forward` of trl.experimental.ppo.ppo_trainer are wrapped to time generation, scoring
  (get_reward on the reward model), rollout forwards (reference forward, value model) and the training
  forwards.

The parent warms each worker up (--warmup iterations), then asks for one iteration at a time, rotating which
side goes first each round, so load from other processes on a shared machine hits all sides alike.
Episodes/s is the median over timed iterations of B / iteration seconds; --clock cpu times by each worker's
CPU time instead of the wall clock (with --threads 1), which other processes do not inflate. Both clocks
are recorded either way, for the whole iteration and for each part of the split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.2  # issue 33: ours >= 1.2x PPOTrainer, ours critic-free >= 1.2x RLOOTrainer
LR, EPS, KL_COEF, GRAD_CLIP, SEED = 1e-5, 1e-5, 0.05, 1.0, 1337
SIDES = ("ours", "ours-rloo", "rloo", "ppo112")
PARTS = ("generation", "scoring", "rollout_forwards", "update", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="chatloop.model.PRESETS name of both models")
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary size (the loop's tiny config)")
    p.add_argument("--batch-size", type=int, default=32, help="episodes per iteration (B)")
    p.add_argument("--minibatches", type=int, default=2, help="minibatches (optimizer steps) per PPO epoch")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over each batch")
    p.add_argument("--response-tokens", type=int, default=40, help="sampled tokens per response (fixed)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="every prompt renders to exactly this many tokens")
    p.add_argument("--num-generations", type=int, default=2, help="RLOO completions per prompt (G >= 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per side")
    p.add_argument("--iterations", type=int, default=6, help="timed iterations per side")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES, help="which sides to run")
    p.add_argument("--trl112", default="/work/trl112", help="directory holding trl 1.12.0 (pip --target)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time iterations by the wall clock or by the worker's CPU time (needs --threads 1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="every side: fp32, or bf16 autocast (ours --precision=bf16, TRL bf16=True)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 timed iteration, smaller batch")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/ppo_throughput*.json)")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.iterations, args.batch_size, args.response_tokens = 1, 1, 8, 8
    if args.batch_size % args.minibatches or args.batch_size % args.num_generations or args.num_generations < 2:
        p.error("--batch-size must be divisible by --minibatches and --num-generations (>= 2)")
    name = "ppo_throughput" + ("_cpu_clock" if args.clock == "cpu" else "")
    name += ("_bf16" if args.precision == "bf16" else "") + ("_quick" if args.quick else "")
    args.out = Path(args.out) if args.out else _bench.RESULTS / f"{name}.json"
    return args


# ---------------------------------------------------------------- worker side


class Split:
    """Wall and CPU seconds per part of an iteration, accumulated by `timed` blocks (which may nest: an inner
    block's time is taken out of the outer one's part)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._inner: list[list[float]] = []

    @contextmanager
    def timed(self, part: str):
        self._inner.append([0.0, 0.0])
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            dw, dc = time.perf_counter() - w, time.process_time() - c
            inner_w, inner_c = self._inner.pop()
            self.add(part, dw - inner_w, dc - inner_c)
            if self._inner:
                self._inner[-1][0] += dw
                self._inner[-1][1] += dc

    def add(self, part: str, wall: float, cpu: float) -> None:
        self.wall[part] = self.wall.get(part, 0.0) + wall
        self.cpu[part] = self.cpu.get(part, 0.0) + cpu

    def take(self) -> dict[str, dict[str, float]]:
        out = {"wall": dict(self.wall), "cpu": dict(self.cpu)}
        self.wall, self.cpu = {}, {}
        return out


class Stop(Exception):
    """Raised inside a training loop when the parent says "exit"."""


class IterationChannel:
    """The worker's end of the protocol, driven from inside a training loop: `boundary()` is called between
    iterations; it answers the running "step" command (seconds since it arrived, the split), then serves
    commands until the next "step" (returns) or "exit" (raises Stop)."""

    def __init__(self, split: Split) -> None:
        self.out: TextIO = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # library output (progress bars, warnings) must not corrupt the protocol
        self.split = split
        self.started: float | None = None
        self.started_cpu = 0.0

    def reply(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def boundary(self, episodes: int) -> None:
        if self.started is not None:
            self.reply({"seconds": time.perf_counter() - self.started,
                        "cpu_seconds": time.process_time() - self.started_cpu, "episodes": episodes,
                        "split": self.split.take()})
            self.started = None
        self.split.take()  # whatever ran between commands (setup) is not part of any iteration
        for line in sys.stdin:
            op = json.loads(line)["op"]
            if op == "memory":
                self.reply(_bench.peak_memory(_cpu()))
            elif op == "ready":
                _bench.reset_peak_memory(_cpu())
                self.reply({"ok": True, "rss_mb": _bench.rss_mb()})
            elif op == "step":
                self.split.take()
                self.started, self.started_cpu = time.perf_counter(), time.process_time()
                return
            elif op == "exit":
                raise Stop
            else:
                raise ValueError(f"unknown op {op!r}")
        raise Stop


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


def _threads(spec: dict[str, Any]) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])


def ours_worker(spec: dict[str, Any]) -> None:
    import chatloop.train.ppo as ppo_mod

    _threads(spec)
    split = Split()
    channel = IterationChannel(split)
    real = {name: getattr(ppo_mod, name) for name in ("lr_for", "generate", "make_batch", "ppo_update", "load_model")}

    def lr_for(iteration: int, cfg: Any) -> float:  # the top of every iteration
        channel.boundary(cfg.batch_size)
        return real["lr_for"](iteration, cfg)

    def generate(model, prompts, max_new_tokens, pad_id, stop_ids, **kwargs):
        with split.timed("generation"):  # no stop token: every response is exactly max_new_tokens long
            return real["generate"](model, prompts, max_new_tokens, pad_id, [], **kwargs)

    def make_batch(*a: Any, **kw: Any) -> Any:
        with split.timed("rollout_forwards"):
            return real["make_batch"](*a, **kw)

    def ppo_update(*a: Any, **kw: Any) -> Any:
        with split.timed("update"):
            return real["ppo_update"](*a, **kw)

    def load_model(directory: Any, *a: Any, **kw: Any) -> Any:
        model = real["load_model"](directory, *a, **kw)
        if str(directory) == spec["rm"] and "head" not in kw:  # the frozen reward model (the value model has head=)
            blocks: list[Any] = []

            def before(*_: Any) -> None:
                blocks.append(split.timed("scoring"))
                blocks[-1].__enter__()

            def after(*_: Any) -> None:
                blocks.pop().__exit__(None, None, None)

            model.register_forward_pre_hook(before)
            model.register_forward_hook(after)
        return model

    for name, fn in (("lr_for", lr_for), ("generate", generate), ("make_batch", make_batch),
                     ("ppo_update", ppo_update), ("load_model", load_model)):
        setattr(ppo_mod, name, fn)
    cfg = ppo_mod.PPOConfig(
        out=spec["out"], policy=spec["policy"], reward_model=spec["rm"], prompts=[spec["prompts_file"]],
        iterations=10**6, batch_size=spec["batch_size"], minibatches=spec["minibatches"],
        ppo_epochs=spec["ppo_epochs"], max_new_tokens=spec["response_tokens"], max_prompt_tokens=spec["prompt_tokens"],
        temperature=1.0, top_k=0, top_p=1.0, kl_coef=KL_COEF, lr=LR, eps=EPS, warmup_steps=0, weight_decay=0.0,
        grad_clip=GRAD_CLIP, precision=spec["precision"], device="cpu", seed=SEED, save_every=10**9, sample_every=0,
        log_every=1, progress=False,
        # ours-rloo: the critic-free estimator at RLOO's samples per prompt (no value model, half the update)
        **({"algorithm": "rloo", "samples_per_prompt": spec["num_generations"]} if spec["side"] == "ours-rloo" else {}),
    )
    with suppress(Stop):
        ppo_mod.ppo(cfg)


def _hf_models(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")

    def lm() -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32,
                                                                 attn_implementation="sdpa")

    def scalar() -> Any:
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            spec["rm"], num_labels=1, dtype=torch.float32, attn_implementation="sdpa")

    return tokenizer, lm, scalar


def rloo_worker(spec: dict[str, Any]) -> None:
    import datasets
    import torch
    import transformers
    import trl

    _threads(spec)
    split = Split()
    channel = IterationChannel(split)
    tokenizer, lm, scalar = _hf_models(spec)
    rm_tokenizer = transformers.AutoTokenizer.from_pretrained(spec["rm"])
    steps_per_iteration = spec["minibatches"] * spec["ppo_epochs"]
    n = spec["response_tokens"]
    args = trl.RLOOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"] // spec["minibatches"],
        gradient_accumulation_steps=1, steps_per_generation=spec["minibatches"], num_iterations=spec["ppo_epochs"],
        num_generations=spec["num_generations"], max_completion_length=n, generation_kwargs={"min_new_tokens": n},
        temperature=1.0, top_k=0, top_p=1.0, beta=KL_COEF, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, adam_epsilon=EPS, weight_decay=0.0, max_grad_norm=GRAD_CLIP, optim="adamw_torch_fused",
        bf16=spec["precision"] == "bf16", fp16=False, use_cpu=True, gradient_checkpointing=False, report_to=[],
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, max_steps=10**6, seed=SEED, log_completions=False,
    )

    class Timed(trl.RLOOTrainer):
        def training_step(self, *a: Any, **kw: Any) -> Any:
            with split.timed("update"):  # its first step of an iteration generates and scores (timed inside)
                return super().training_step(*a, **kw)

        def _generate_and_score_completions(self, *a: Any, **kw: Any) -> Any:
            with split.timed("rollout_forwards"):
                return super()._generate_and_score_completions(*a, **kw)

        def _generate(self, *a: Any, **kw: Any) -> Any:
            with split.timed("generation"):
                return super()._generate(*a, **kw)

        def _calculate_rewards(self, *a: Any, **kw: Any) -> Any:
            with split.timed("scoring"):
                return super()._calculate_rewards(*a, **kw)

        def _get_per_token_logps_and_entropies(self, *a: Any, **kw: Any) -> Any:
            if torch.is_grad_enabled():
                return super()._get_per_token_logps_and_entropies(*a, **kw)
            with split.timed("rollout_forwards"):
                return super()._get_per_token_logps_and_entropies(*a, **kw)

    class Boundary(transformers.TrainerCallback):
        steps = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            channel.boundary(spec["batch_size"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps += 1
            if self.steps % steps_per_iteration == 0:
                channel.boundary(spec["batch_size"])

    texts = json.loads(Path(spec["prompts_cut"]).read_text())["texts"]
    dataset = datasets.Dataset.from_list([{"prompt": t} for t in texts])
    trainer = Timed(model=lm(), reward_funcs=scalar(), args=args, train_dataset=dataset, processing_class=tokenizer,
                    reward_processing_classes=rm_tokenizer, callbacks=[Boundary()])
    with suppress(Stop):
        trainer.train()


def ppo112_worker(spec: dict[str, Any]) -> None:
    import datasets
    import torch
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as pt
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if not trl.__version__.startswith("1.12"):
        raise RuntimeError(f"expected trl 1.12 first on the path, got {trl.__version__} from {trl.__file__}")
    _threads(spec)
    split = Split()
    channel = IterationChannel(split)
    tokenizer, lm, scalar = _hf_models(spec)
    reward_model = scalar()
    real_generation, real_get_reward, real_forward = pt.batch_generation, pt.get_reward, pt.forward

    def batch_generation(*a: Any, **kw: Any) -> Any:
        with split.timed("generation"):
            return real_generation(*a, **kw)

    def get_reward(model: Any, *a: Any, **kw: Any) -> Any:
        with split.timed("scoring" if model is reward_model else "rollout_forwards"):
            return real_get_reward(model, *a, **kw)

    update_start: list[float] = []  # (wall, cpu) of the iteration's first training forward

    def forward(*a: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled():  # the PPO epochs: timed from the first training forward to the step's end
            if not update_start:
                update_start.extend([time.perf_counter(), time.process_time()])
            return real_forward(*a, **kw)
        with split.timed("rollout_forwards"):  # the reference model
            return real_forward(*a, **kw)

    pt.batch_generation, pt.get_reward, pt.forward = batch_generation, get_reward, forward

    class Boundary(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            channel.boundary(spec["batch_size"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if update_start:  # optimisation, its statistics and logging, the scheduler step
                split.add("update", time.perf_counter() - update_start[0], time.process_time() - update_start[1])
                update_start.clear()
            channel.boundary(spec["batch_size"])

    b = spec["batch_size"]
    args = PPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=b, gradient_accumulation_steps=1,
        num_mini_batches=spec["minibatches"], num_ppo_epochs=spec["ppo_epochs"],
        response_length=spec["response_tokens"], stop_token=None, missing_eos_penalty=None, temperature=1.0,
        kl_coef=KL_COEF, local_rollout_forward_batch_size=b,
        total_episodes=b * 10**5, num_sample_generations=0, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, adam_epsilon=EPS, weight_decay=0.0, optim="adamw_torch_fused",
        bf16=spec["precision"] == "bf16", fp16=False, use_cpu=True, gradient_checkpointing=False, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
        sft_model_path=spec["policy"],
        reward_model_path=spec["rm"],
    )
    dataset = datasets.Dataset.from_dict({"input_ids": json.loads(Path(spec["prompts_cut"]).read_text())["ids"]})
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=lm(), ref_model=lm(), reward_model=reward_model,
                         value_model=scalar(), train_dataset=dataset, eval_dataset=dataset.select(range(b)),
                         callbacks=[Boundary()])
    with suppress(Stop):
        trainer.train()


# ---------------------------------------------------------------- parent side


def build_setup(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """World, tokenizer, fixed-length prompts, random-init policy and reward-model checkpoints."""
    import torch
    import transformers

    from chatloop.checkpoint import save_model
    from chatloop.data.formats import prompt_messages, read_records
    from chatloop.model import GPT, preset
    from chatloop.tokenizer import TokenizerConfig, train_tokenizer
    from chatloop.world.files import WorldConfig, write_world

    write_world(WorldConfig(out=str(tmp / "world"), seed=SEED, pretrain_mb=0.5, prompts=3000, demonstrations=200,
                            rankings=20, ratings=20, eval_prompts=50, stats=False))
    tokenizer = train_tokenizer(TokenizerConfig(inputs=[str(tmp / "world" / "pretrain.txt")], out=str(tmp / "tok"),
                                                vocab_size=args.vocab))
    max_len = args.prompt_tokens + args.response_tokens
    torch.manual_seed(SEED)
    policy = GPT(preset(args.preset, {"vocab_size": tokenizer.vocab_size, "max_seq_len": max(max_len, 64)}))
    save_model(policy, tmp / "sft", tokenizer)
    rm = GPT(preset(args.preset, {"vocab_size": tokenizer.vocab_size, "max_seq_len": max(max_len, 64),
                                  "head": "scalar"}))
    save_model(rm, tmp / "rm", tokenizer)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp / "sft")
    records, ids, texts = [], [], []
    for record in read_records(tmp / "world" / "prompts.jsonl", "prompt"):
        if len(records) == 512:
            break
        rendered = tokenizer.render_chat(prompt_messages(record["prompt"]), add_generation_prompt=True)[0]
        if len(rendered) < args.prompt_tokens:
            continue
        rendered = rendered[-args.prompt_tokens:]  # what ours does with max_prompt_tokens
        text = hf_tok.decode(rendered, skip_special_tokens=False)
        if hf_tok(text)["input_ids"] != rendered:  # RLOO tokenizes the text itself
            continue
        records.append(record)
        ids.append(rendered)
        texts.append(text)
    if len(records) < args.batch_size:
        sys.exit(f"only {len(records)} world prompts render to at least {args.prompt_tokens} tokens (and round-trip "
                 f"through transformers' tokenizer when cut); choose a smaller --prompt-tokens")
    prompts_file, cut_file = tmp / "prompts.jsonl", tmp / "prompts_cut.json"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    cut_file.write_text(json.dumps({"ids": ids, "texts": texts}))
    return {"policy": str(tmp / "sft"), "rm": str(tmp / "rm"), "prompts_file": str(prompts_file),
            "prompts_cut": str(cut_file), "prompts": len(ids), "params": policy.num_params(),
            "vocab_size": tokenizer.vocab_size}


def run_sides(spec: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    workers: dict[str, _bench.Worker] = {}
    rows: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    setup: dict[str, dict[str, Any]] = {}
    try:
        for side in args.sides:  # one after the other: a setup must not overlap another side's warmup
            env = {"PYTHONPATH": os.pathsep.join([args.trl112, str(REPO)])} if side == "ppo112" else {}
            env["TRL_EXPERIMENTAL_SILENCE"] = "1"
            start = time.perf_counter()
            workers[side] = _bench.Worker(__file__, {**spec, "side": side, "out": str(tmp / f"out-{side}")},
                                          args.verbose, env=env)
            workers[side].call("ready")
            setup[side] = {"setup_s": round(time.perf_counter() - start, 1)}
            for _ in range(args.warmup):
                workers[side].call("step")
            print(f"  {side}: ready ({setup[side]['setup_s']} s setup)", flush=True)
        names = list(workers)
        for r in range(args.iterations):
            order = names[r % len(names):] + names[: r % len(names)]
            for side in order if r % 2 == 0 else order[::-1]:
                rows[side].append(workers[side].call("step"))
            print(f"  round {r + 1}/{args.iterations}: " + ", ".join(
                f"{s} {rows[s][-1]['seconds']:.2f} s wall / {rows[s][-1]['cpu_seconds']:.2f} s cpu" for s in names),
                flush=True)
        for side, w in workers.items():
            setup[side].update(w.call("memory"))
    finally:
        for w in workers.values():
            try:
                w.close()
            except Exception as e:  # noqa: BLE001  (a worker that died is reported by its call above)
                print(f"closing a worker: {e}", file=sys.stderr)
    return {side: {"rows": rows[side], **setup[side]} for side in rows}


def summarise(side: dict[str, Any], clock: str) -> dict[str, Any]:
    rows = side["rows"]
    key = "cpu_seconds" if clock == "cpu" else "seconds"
    split_clock = "cpu" if clock == "cpu" else "wall"
    totals = [r[key] for r in rows]
    parts: dict[str, float] = {}
    for part in PARTS[:-1]:
        parts[part] = statistics.median(r["split"][split_clock].get(part, 0.0) for r in rows)
    iteration = statistics.median(totals)
    parts["other"] = max(0.0, iteration - sum(parts.values()))
    return {
        "episodes_per_s": round(statistics.median(r["episodes"] / r[key] for r in rows), 3),
        "iteration_s": {k: round(v, 3) if isinstance(v, float) else v for k, v in _bench.summary(totals).items()},
        "wall_iteration_median_s": round(statistics.median(r["seconds"] for r in rows), 3),
        "cpu_iteration_median_s": round(statistics.median(r["cpu_seconds"] for r in rows), 3),
        "split_s": {k: round(v, 3) for k, v in parts.items()},
        "split_share": {k: round(v / iteration, 3) for k, v in parts.items()},
        "setup_s": side["setup_s"], "peak_rss_mb": round(side["peak_mb"], 1),
        "iterations": [[round(r["seconds"], 3), round(r["cpu_seconds"], 3),
                        {k: round(v, 3) for k, v in r["split"][split_clock].items()}] for r in rows],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        workers = {"ours": ours_worker, "ours-rloo": ours_worker, "rloo": rloo_worker, "ppo112": ppo112_worker}
        workers[spec["side"]](spec)
        return

    import torch
    import transformers
    import trl

    _bench.check_clock(args.clock, args.threads, torch.device("cpu"))
    if "ppo112" in args.sides and not (Path(args.trl112) / "trl" / "experimental" / "ppo").is_dir():
        print(f"{args.trl112}: no trl 1.12 there; skipping the PPOTrainer side")
        args.sides = [s for s in args.sides if s != "ppo112"]
    info = _bench.machine(torch.device("cpu"))
    info.update(clock=args.clock, trl=trl.__version__, trl_ppo="1.12.0 from " + args.trl112,
                uptime_start=_bench.uptime(), worker_threads=args.threads or info["threads"])
    print(f"# PPO throughput, cpu {args.precision}: {info['cpu']}, {info['worker_threads']} threads, {args.clock} "
          "clock; "
          f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']} (RLOO), 1.12.0 (PPO)")
    print(f"uptime (start): {info['uptime_start']}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        setup = build_setup(args, tmp)
        spec = {k: setup[k] for k in ("policy", "rm", "prompts_file", "prompts_cut")}
        spec.update(batch_size=args.batch_size, minibatches=args.minibatches, ppo_epochs=args.ppo_epochs,
                    response_tokens=args.response_tokens, prompt_tokens=args.prompt_tokens,
                    num_generations=args.num_generations, threads=args.threads, precision=args.precision)
        print(f"{setup['prompts']} prompts of {args.prompt_tokens} tokens; {args.preset} "
              f"({setup['params'] / 1e6:.1f}M params, vocab {setup['vocab_size']}); B={args.batch_size}, "
              f"{args.minibatches} minibatches x {args.ppo_epochs} epochs, {args.response_tokens} response tokens; "
              f"running ({_bench.uptime()})", flush=True)
        raw = run_sides(spec, args, tmp)
    info["uptime_end"] = _bench.uptime()
    print(f"uptime (end): {info['uptime_end']}")
    _bench.write_results(args.out.with_suffix(".raw.json"), {"args": {k: str(v) for k, v in vars(args).items()},
                                                             "machine": info, "raw": raw})
    results = {side: summarise(r, args.clock) for side, r in raw.items()}
    # Each of ours against its like: PPO against PPOTrainer, the critic-free one against RLOOTrainer.
    peers = {"ours": "ppo112", "ours-rloo": "rloo"}
    for ours, peer in peers.items():
        if ours in results and peer in results:
            results[f"ratio_{ours}_vs_{peer}"] = round(
                results[ours]["episodes_per_s"] / results[peer]["episodes_per_s"], 3)
    names = {"ours": "chatloop ppo", "ours-rloo": "chatloop ppo --algorithm=rloo",
             "rloo": f"TRL {trl.__version__} RLOOTrainer", "ppo112": "TRL 1.12.0 PPOTrainer"}
    print(f"\n| side | episodes/s | ours / its peer | iteration s | {' | '.join(PARTS)} | peak RSS MiB |")
    print("|---|---:|---:|---:|" + "---:|" * len(PARTS) + "---:|")
    for side in raw:
        r = results[side]
        ratio = f"{results[f'ratio_{side}_vs_{peers[side]}']:.2f}x" if f"ratio_{side}_vs_{peers.get(side)}" in results \
            else ""
        cells = " | ".join(f"{r['split_s'][p]:.2f} s ({100 * r['split_share'][p]:.0f}%)" for p in PARTS)
        print(f"| {names[side]} | {r['episodes_per_s']:.2f} | {ratio} | {r['iteration_s']['median_s']:.2f} | {cells} | "
              f"{r['peak_rss_mb']:,.0f} |")
    record = {"benchmark": "ppo_throughput", "command": " ".join(["benchmarks/ppo_throughput.py", *sys.argv[1:]]),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "precision": args.precision,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl_rloo": trl.__version__, "trl_ppo": "1.12.0"},
              "workload": {"preset": args.preset, "params": setup["params"], "vocab": setup["vocab_size"],
                           "batch_size": args.batch_size, "minibatches": args.minibatches,
                           "ppo_epochs": args.ppo_epochs, "response_tokens": args.response_tokens,
                           "prompt_tokens": args.prompt_tokens, "rloo_num_generations": args.num_generations,
                           "kl_coef": KL_COEF, "lr": LR, "adam_eps": EPS},
              "warmup": args.warmup, "iterations": args.iterations, "clock": args.clock, "threads": args.threads,
              "target_ratio": TARGET_RATIO, "results": results,
              "iteration_columns": ["wall_s", "cpu_s", "split (per the clock)"]}
    _bench.write_results(args.out, record)


if __name__ == "__main__":
    main()
