"""Models of public codebases at tiny sizes, for tests/test_primitive_corpus.py.

One module per source file, each naming its repository, file, commit and license, and
what it stubs or leaves out:

- :mod:`flax_lm1b`: the Flax lm1b example's decoder-only Transformer LM;
- :mod:`flax_wmt`: the Flax wmt example's encoder-decoder Transformer;
- :mod:`flax_sst2`: the Flax sst2 example's bidirectional-LSTM text classifier;
- :mod:`big_vision_vit`: big_vision's ViT (gap/map/tok pooling, scanned layer stack);
- :mod:`big_vision_mlp_mixer`: big_vision's MLP-Mixer;
- :mod:`hf_bert`, :mod:`hf_gpt2`, :mod:`hf_vit`, :mod:`hf_t5`: the Flax model hub's
  (transformers 4.46.3) BERT masked LM, GPT-2 LM, ViT classifier and T5 encoder-decoder,
  their nn.Module classes ported without the transformers package.

All are re-implementations, not copies (public repositories' code stays out of this
project's commits): the same Flax layers and arguments, the same operations in the same
order and the same parameter names, checked against the original sources at JAX 0.10.2
(the same primitives with the same counts, the same outputs on the same parameters).
"""
