"""On-disk formats of φ: adapter directories (PEFT layout) and, later, sparse diffs."""
