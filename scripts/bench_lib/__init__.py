"""What the benchmark scripts in ``scripts/`` share, and each benchmark's parts.

* :mod:`.common`: the lr schedule, strict JSON, the machine line, markdown sections;
* :mod:`.data`: scikit-learn digits and ggplot2's diamonds as standardised splits;
* :mod:`.models`: the MLP, the small CNN and the small HF ViT both benchmarks train;
* :mod:`.convergence` (``scripts/benchmark_convergence.py``): ``grid`` (settings and
  runs), ``runner`` (training and the driver), ``analysis`` (the report), ``render``
  (markdown and plots);
* :mod:`.sensitivity` (``scripts/benchmark_sensitivity.py``): ``grid`` (settings, run
  specs, phases, the cell rules), ``plan`` (CPU cost), ``runner`` (training, workers,
  the resumable JSON), ``analysis`` (stable areas, seed summaries), ``render``
  (markdown and heat maps).

The entry scripts put ``scripts/`` and the repository root on ``sys.path``; the
tests do the same (``tests/conftest.py``).
"""
