"""Where users already train: Lightning, the Hugging Face Trainer, TensorBoard.

Each integration is its own module and imports its framework only when imported itself, so
``import mixprec`` never needs them. Install the extra of the one you use:

========================================  ==========================  =======================
module                                    what                        extra
========================================  ==========================  =======================
:mod:`mixprec.integrations.lightning`     ``MixprecPrecision`` plugin ``mixprec[lightning]``
                                          for ``Trainer`` / ``Fabric``,
                                          ``NumericsMonitor`` callback
:mod:`mixprec.integrations.transformers`  ``MixprecTrainer``,         ``mixprec[hf]``
                                          ``NumericsMonitorCallback``
:mod:`mixprec.integrations.tensorboard`   ``TensorBoardLogger``        ``mixprec[tensorboard]``
========================================  ==========================  =======================

See docs/integrations.md for an example of each.
"""
