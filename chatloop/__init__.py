"""chatloop: the InstructGPT training loop, from tokenizer to PPO, with humans in it."""

__version__ = "0.1.0"
