"""The toy world's pipeline (the world itself is ``atmanrl.tasks.toyworld``).

- ``sft``: the supervised warm start of a tiny Llama, built once and cached on disk (``load("toyworld-sft")``).
- ``truth``: planted truth by intervention, AUROC / top-1 of saliency against it, the saliency read-outs studied.
- ``evaluate``: held-out evaluation, the Table 1 block plus what only the toy world can count.
"""
