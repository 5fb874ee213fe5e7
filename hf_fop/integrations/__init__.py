"""The HuggingFace front ends of FOP (they import transformers or accelerate; the core in ``hf_fop`` does not).

* :mod:`.routing`: how one optimizer step's micro-batches become FOP's two sub-batches (pure; both front ends use it);
* :mod:`.arguments`: :class:`FOPTrainingArguments`, ``TrainingArguments`` with typed ``fop_*`` fields;
* :mod:`.trainer`: :class:`FOPTrainer`, the ``Trainer`` that drives FOP;
* :mod:`.checkpoints`: model-weight loading fixes the Trainer's resume needs (checkpoint key names, tied weights);
* :mod:`.accelerate`: :func:`attach_accelerate` and :func:`sub_batches` for a plain Accelerate loop.
"""
