"""Post-hoc calibration of per-voxel predictive distributions.

:class:`Calibrator` is the interface (scikit-learn estimators mapping a
predictive mean and std to a calibrated distribution, and a
:class:`~uqsynth.predictive.Predictive` to another through
:meth:`Calibrator.calibrate`); :class:`StreamingCalibrator` the base of
those fitted from additive summaries. The built-ins (``isotonic``,
``sigma_scaling``, ``conformal``) accept std 0 and give it a fitted,
positive width (:mod:`uqsynth.calibration._scale`).
"""

from uqsynth.calibration.base import Calibrator, StreamingCalibrator, check_inputs, check_probabilities

__all__ = ["Calibrator", "StreamingCalibrator", "check_inputs", "check_probabilities"]
