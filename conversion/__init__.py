"""Checkpoint converters: seed the package's architectures from a GPT-2 checkpoint (`python -m
conversion.gpt2_to_<arch>`), and convert official checkpoints to our layout (`conversion.molm_to_moduleformer` for
IBM's ModuleFormer/MoLM, `conversion.official_moeut_to_moeut` for the MoEUT authors' code)."""
