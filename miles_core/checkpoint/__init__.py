"""Checkpoints in and out: HF safetensors directories, GGUF import and model-source resolution.

`hf` reads and writes HF-format directories (config, safetensors weights, tokenizer files);
`gguf` turns a llama.cpp GGUF file into such a directory; `sources` maps what a user names
(a directory, a `.gguf` file, a built-in model) to a directory, caching conversions.
"""
