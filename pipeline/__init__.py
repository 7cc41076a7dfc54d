"""posttrain's machinery: the run framework, the vLLM engines, model building, training helpers, reporting.

Layers, lowest first; a module imports only from its own layer or lower ones (imports inside functions too):

0. ``files``, ``executor``, ``memory``, ``records``, ``templates``, ``thinking``, ``tracking``: atomic files and
   hashes, running work on Ray, the heap policy, record schemas, prompt templates, fast/slow thinking modes,
   experiment tracking. They import nothing of the project.
1. ``models`` (the model catalog, upcycling) and ``training`` (MoE training helpers, the Ray Train launcher).
2. ``engines``: vLLM engines on Ray actors and the weight sync into them.
3. ``critique/`` and ``reward/`` (top-level packages): the critique model's prompts and parsing, rule QC,
   self-consistency; reward-model training and scoring.
4. ``run``: the framework that runs stages (config, registry, stage contract, runner, artifact store).
5. ``stages/`` (top-level package): the recipe's stages.
6. ``reporting`` and ``cli``: the report, dataset cards, publication and the ``posttrain`` command; they may
   read what stages declare (e.g. the metric keys they write).
"""
