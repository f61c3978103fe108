"""Built-in datasets: BraTS folders, any paired NIfTI layout, and the phantom."""

from uqsynth.data.brats import BratsDataset
from uqsynth.data.paired_nifti import PairedNiftiDataset
from uqsynth.data.phantom import PhantomDataset
from uqsynth.hookspecs import hookimpl


@hookimpl
def uqsynth_register_datasets(register):
    register("brats", BratsDataset)
    register("paired_nifti", PairedNiftiDataset)
    register("phantom", PhantomDataset)
