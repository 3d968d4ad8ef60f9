"""What a run shows: logs and a progress bar (:mod:`.logs`), TensorBoard scalars
(:mod:`.tensorboard`), and the typed reports that become ``summary.json`` (:mod:`.summary`)."""
