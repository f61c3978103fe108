"""Built-in likelihoods: the paper's L1, a heteroscedastic Laplace and a heteroscedastic Gaussian."""

from uqsynth.hookspecs import hookimpl
from uqsynth.likelihoods import L1, Gaussian, Laplace


@hookimpl
def uqsynth_register_likelihoods(register):
    register("l1", L1)
    register("laplace", Laplace)
    register("gaussian", Gaussian)
