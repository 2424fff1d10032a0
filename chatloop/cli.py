"""`chatloop <verb>`: parse the verb's config (YAML + overrides, see chatloop.config) and run the stage.

Each verb is a (module, config dataclass, function) triple, imported only when used so that
`chatloop --help` stays fast and a verb's heavy imports never slow down another.
"""

from __future__ import annotations

import importlib
import signal
import sys

from chatloop.config import help_text, parse_args
from chatloop.errors import Stopped, UserError

# verb: (module, config class, function, one-line description)
VERBS: dict[str, tuple[str, str, str, str]] = {
    "tokenizer": ("chatloop.tokenizer", "TokenizerConfig", "train_tokenizer", "train a byte-level BPE tokenizer"),
    "pretrain": ("chatloop.train.pretrain", "PretrainConfig", "pretrain", "next-token prediction on text"),
    "sft": ("chatloop.train.sft", "SFTConfig", "sft", "supervised fine-tuning on demonstrations"),
    "sample": ("chatloop.sample", "SampleConfig", "sample", "sample K answers per prompt (to be ranked)"),
    "rank": ("chatloop.world.labelers", "RankConfig", "rank", "rank samples with the world's simulated labelers"),
    "rm": ("chatloop.train.reward", "RMConfig", "reward_model", "train a reward model from K-wise rankings"),
    "rm-eval": ("chatloop.train.reward", "RMEvalConfig", "rm_eval", "a reward model's accuracy on held-out rankings"),
    "dpo": ("chatloop.train.dpo", "DPOConfig", "dpo", "DPO on K-wise rankings (no reward model, no sampling)"),
    "ppo": ("chatloop.train.ppo", "PPOConfig", "ppo", "PPO / PPO-ptx against the reward model"),
    "eval": ("chatloop.evaluate", "EvalConfig", "evaluate", "compare checkpoints on held-out prompts"),
    "run": ("chatloop.pipeline", "RunConfig", "run", "the whole loop from one config (default: configs/tiny.yaml)"),
    "import": ("chatloop.model_import", "ImportConfig", "import_model",
               "a GGUF file or Hugging Face model directory as a chatloop checkpoint"),
    "export": ("chatloop.export", "ExportConfig", "export",
               "a checkpoint as a GGUF file (llama.cpp, ollama) or a merged safetensors directory"),
    "loop": ("chatloop.realloop", "LoopConfig", "loop",
             "the loop on real data from an imported chat model (configs/smollm2.yaml)"),
    "generate": ("chatloop.generate", "GenerateConfig", "generate", "sample from a checkpoint"),
    "world": ("chatloop.world.files", "WorldConfig", "write_world", "write the synthetic instruction world"),
    "prompts ingest": ("chatloop.data.prompts", "IngestConfig", "ingest",
                       "add prompt records / request logs to the prompt store (idempotent)"),
    "prompts curate": ("chatloop.data.curate", "CurateConfig", "curate",
                       "dedup, cap per user, remove PII, tag categories, split by user"),
    "prompts export": ("chatloop.data.prompts", "PromptExportConfig", "export",
                       "write the SFT/RM/PPO/val/test prompt sets of a curation"),
    "prompts feedback": ("chatloop.data.feedback", "FeedbackConfig", "export_feedback",
                         "the chat page's thumbs and regenerations as rankings for chatloop rm"),
    "prompts stats": ("chatloop.data.prompts", "PromptStatsConfig", "stats", "counts of the prompt store"),
    "label serve": ("chatloop.labeling.commands", "LabelServeConfig", "serve", "run the labelers' web app"),
    "label batch": ("chatloop.labeling.commands", "BatchConfig", "batch",
                    "create a labeling batch from JSONL, the prompt store, or samples of a checkpoint"),
    "label invite": ("chatloop.labeling.commands", "InviteConfig", "invite", "print a one-use invite link"),
    "label export": ("chatloop.labeling.commands", "LabelExportConfig", "export",
                     "write labels as the records chatloop sft / rm read"),
    "label stats": ("chatloop.labeling.commands", "LabelStatsConfig", "stats",
                    "progress, throughput, agreement and gold accuracy"),
    "label simulate": ("chatloop.world.simulate", "SimulateConfig", "simulate",
                       "simulated labelers (or screening applicants) of a world work the open batches"),
    "label plan": ("chatloop.labeling.commands", "PlanConfig", "plan_cmd", "labelers needed against days to finish"),
    "serve": ("chatloop.serve.api", "ServeConfig", "serve", "OpenAI-compatible API and chat page; logs prompts"),
    "chat": ("chatloop.serve.chat", "ChatConfig", "chat", "chat with a checkpoint in the terminal"),
    "demo": ("chatloop.demo", "DemoConfig", "demo", "world, tokenizer, tiny GPT, samples (`make quick`)"),
}


def usage() -> str:
    lines = ["usage: chatloop VERB [--config FILE.yaml] [--FIELD=VALUE ...]", "", "verbs:"]
    lines += [f"  {verb:<16} {desc}" for verb, (*_, desc) in VERBS.items()]
    lines += ["", "`chatloop VERB --help` lists every field of the verb's config with its default."]
    return "\n".join(lines)


def _finish_distributed() -> None:
    """Under torchrun, a stage that finished ends its process here, once every rank has finished
    (distributed.finish). Only on success: a rank that failed must not wait for the others."""
    distributed = sys.modules.get("chatloop.distributed")  # imported by every stage that can run under it
    if distributed is not None:
        distributed.finish()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if rest and f"{verb} {rest[0]}" in VERBS:  # two-word verbs: `chatloop prompts ingest ...`
        verb, rest = f"{verb} {rest[0]}", rest[1:]
    if verb in ("-V", "--version"):
        from chatloop import __version__

        print(__version__)
        return 0
    if verb not in VERBS:
        group = [v for v in VERBS if v.startswith(verb + " ")]
        hint = f"; `{verb}` takes one of: {', '.join(v.split()[1] for v in group)}" if group else ""
        print(f"chatloop: unknown verb {' '.join(argv[:2]) if group else verb!r}{hint}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module_name, config_name, function_name, desc = VERBS[verb]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    if any(a in ("-h", "--help") for a in rest):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `chatloop sft --help | head` ends quietly
        print(f"usage: chatloop {verb} [--config FILE.yaml] [--FIELD=VALUE ...]\n\n{desc}\n\nfields:")
        print(help_text(config_cls))
        return 0
    if verb == "loop" and rest and not rest[0].startswith("--"):  # `chatloop loop CONFIG`
        rest = ["--config", rest[0], *rest[1:]]
    if verb == "run":  # `chatloop run [CONFIG]`: a positional config file, configs/tiny.yaml by default
        if rest and not rest[0].startswith("--"):
            rest = ["--config", rest[0], *rest[1:]]
        elif "--config" not in rest and not any(a.startswith("--config=") for a in rest):
            rest = ["--config", str(module.DEFAULT_CONFIG), *rest]
    try:
        cfg = parse_args(config_cls, rest)
        getattr(module, function_name)(cfg)
        _finish_distributed()
    except Stopped as e:  # SIGTERM / SIGINT: the state is saved, every rank stopped at the same step
        print(f"chatloop {verb}: {str(e).removeprefix(f'{verb}: ')}", file=sys.stderr)
        _finish_distributed()
        return 0
    except UserError as e:  # (a stage's own name first is the verb's again: said once)
        print(f"chatloop {verb}: error: {str(e).removeprefix(f'{verb}: ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chatloop {verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
