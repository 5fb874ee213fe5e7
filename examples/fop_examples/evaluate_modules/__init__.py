"""``evaluate.Metric`` modules that work offline, one per file so ``evaluate.load(path)`` can load each by path.

``evaluate.load("f1")`` or ``"perplexity"`` fetch their scripts from the Hub; these files are loaded by
path instead (:func:`fop_examples.metrics.load_metric`). Imports stay one per line: evaluate's loader parses
them naively.
"""
