"""The method and what it needs, in torch alone (this package never imports torch-pruning, the kernels,
``accel`` or the app): DCP/BWT/HSR as pure tensor functions (:mod:`.method`), tap masks that are part of
the model (:mod:`.masks`), sparse-aware MAC/parameter counting and the pruning summary (:mod:`.cost`,
:mod:`.summary`), the forward probe (:mod:`.probe`), building models by name (:mod:`.zoo`), shared
argument checks (:mod:`.checks`), the one timer (:mod:`.timing`) and full-fp32 references without TF32
(:mod:`.precision`).

Who may import it: every other room (``tp_glue``, ``kernels``, ``accel``, ``app``) and the package root;
``core`` is the bottom of the layout (``core <- tp_glue <- app``, ``core <- kernels <- accel <- app``),
so nothing here may import them back. ``tests/test_layout.py`` enforces both directions.
"""
