"""Sparse fine-tuning whose entries are chosen by training: the methods LT-SFT and
diff-pruning (``fine_tuning``) and their sparse φ: adapter layout, attaching and folding
(``phi``). Training them is ``peftcli.training.phased`` (selection: ``peftcli.training.selection``);
the ``.diff`` file they also write is ``peftcli.artifacts.sparse_diff``."""
