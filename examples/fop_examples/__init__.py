"""Support code of the ``examples/run_*.py`` scripts (not part of the ``hf_fop`` library).

Kept beside the scripts, as transformers keeps its examples' helpers: the scripts put ``examples/`` on
``sys.path`` by being run from it (``python examples/run_clm.py``), and the tests add it in ``tests/conftest.py``.

* :mod:`.common`: argument dataclasses, dataset loading (map-style or streamed), label checks, the final report;
* :mod:`.data`: the offline default datasets (scikit-learn digits as images, the ChatterBot corpus) and the image collator;
* :mod:`.image_classification`: model and data set-up shared by the two image scripts;
* :mod:`.metrics`: accuracy, macro F1 and perplexity as ``compute_metrics`` functions and offline ``evaluate`` modules.
"""
