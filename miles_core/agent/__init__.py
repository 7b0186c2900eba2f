"""Agentic rollouts: multi-turn conversations with tools and environments, token-exact.

  tool_calls.py    Qwen/Hermes `<tool_call>` parsing (never raises)
  tools.py         tool registry, schemas for the chat template, runner (timeout, subprocess sandbox)
  calculator.py    the shipped example tool
  environments.py  `Environment` (reset/step), the tool-use environment, loading by path
  context.py       `GenerateContext`: what a generate function gets (engine, tokenizer, tools)
  multiturn.py     the built-in multi-turn generate function and its token accounting

Kept light on imports: the tool sandbox imports tool modules in a fresh, memory-limited process.
"""
