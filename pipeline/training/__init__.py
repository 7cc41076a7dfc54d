"""Training helpers shared by the SFT, reward and DPO stages: Hunyuan-Large's MoE settings (hidden dropout,
expert-specific learning rates, router aux loss, expert-load logging) for TRL trainers, and the launcher that
runs a training function as a Ray Train job.

May import layers 0-1 (``files``, ``executor``, ``memory``, ``models``); nothing of ``engines``, ``run`` or
``stages``.
"""
