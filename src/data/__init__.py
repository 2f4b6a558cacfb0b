"""Data: dataset readers (folder -> labelled image list), few-shot sampling, transforms and the
Lightning DataModule."""
