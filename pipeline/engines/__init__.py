"""vLLM engines held by Ray actors, and the weight sync that pushes trained weights into them in memory.

Owns the worker pool (placement, chunked dispatch, restarts of dead workers), the engine actor, the vLLM worker
extension and the sync transports. May import layers 0-1 (``files``, ``executor``, ``memory``, ``models``);
nothing of ``run``, ``stages``, ``critique`` or ``reward``.
"""
