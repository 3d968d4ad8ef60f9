"""The pipeline: a stage's host (:mod:`.stage`), what crosses a stage boundary
(:mod:`.hop`), a replica's driver (:mod:`.driver`), the inner/outer loop (:mod:`.loop`),
config to modules and hosts (:mod:`.build`), and the single-process twin
(:mod:`.baseline`)."""
