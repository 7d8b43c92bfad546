"""Seed the package's architectures from a GPT-2 checkpoint (`python -m conversion.gpt2_to_<arch>`)."""
