"""Built-in networks: the pix2pix U-Net generator, the U-Net on timm encoders, and the 70x70 PatchGAN."""

from uqsynth.hookspecs import hookimpl
from uqsynth.models.patchgan import PatchGANDiscriminator
from uqsynth.models.timm_unet import TimmUnetGenerator
from uqsynth.models.unet import UnetGenerator


@hookimpl
def uqsynth_register_generators(register):
    register("unet", UnetGenerator)
    register("timm_unet", TimmUnetGenerator)


@hookimpl
def uqsynth_register_discriminators(register):
    register("patchgan", PatchGANDiscriminator)
