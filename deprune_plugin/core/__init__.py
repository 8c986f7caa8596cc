"""The method and what it needs, in torch alone (this package never imports torch-pruning, the kernels,
``accel`` or the app): DCP/BWT/HSR as pure tensor functions (:mod:`.method`), tap masks that are part of
the model (:mod:`.masks`), sparse-aware MAC/parameter counting and the pruning summary (:mod:`.cost`,
:mod:`.summary`), the forward probe (:mod:`.probe`), building models by name (:mod:`.zoo`), shared
argument checks (:mod:`.checks`) and the one timer (:mod:`.timing`).
"""
