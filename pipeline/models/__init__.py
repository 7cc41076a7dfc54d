"""The model catalog: embedded models built locally without network (SmolLM2 from its GGUF, the upcycled MoE
policy, tiny test models), and ``resolve_model`` for an embedded name or a model folder.

May import layer 0 only (``files``); transformers and torch are imported inside functions, so reading the
catalog stays fast.
"""
