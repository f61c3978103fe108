"""Data: subjects on disk, and the paper's shared slice preprocessing.

A dataset plugin (:class:`uqsynth.data.base.Dataset`) lists subjects and loads
one subject's co-registered volumes as stored (:mod:`uqsynth.data.brats`,
:mod:`uqsynth.data.paired_nifti`, all reading through
:mod:`uqsynth.data.nifti`, which validates every file). What the paper then
does to the volumes (axial slicing found from the affine, per-slice
normalization, resizing and cropping) lives once, in :mod:`uqsynth.data.slices`;
:mod:`uqsynth.data.split` divides subjects into train/test/calibration sets.
"""
