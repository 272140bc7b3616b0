"""The deep weight prior (DWP): an implicit VAE prior over convolution kernels.

Atanov et al. (2019) put a prior on every 2-D kernel ``w [k, k]`` of a conv layer ``l``
(one kernel per pair of output and input channels) through a latent variable::

    p_l(w) = integral p_l(w | z; phi_l) p(z) dz,    p(z) = N(0, I),
    p_l(w | z; phi_l) = N(w | mu_phi(z), diag sigma_phi(z)^2)

The decoder ``phi_l`` is that of a VAE trained on the kernels of layer ``l`` of nets
already trained on a *source* task (notMNIST for an MNIST target); its encoder
``r_l(z | w; psi_l)`` is kept and used by the auxiliary variational bound on the
target task (:mod:`metaprior.inference.guides.auxiliary`).

This module holds the model side:

- :class:`ConvNet`: the paper's MNIST network (conv k1 -> leaky ReLU -> 2x2 max-pool ->
  conv k2 -> leaky ReLU -> 2x2 max-pool -> linear), used for the source nets, for
  ordinary training from a prior-sampled initialisation, and as the target-task net.
  Its forward pass takes the kernels and the convolution as arguments, so the same
  network runs with point kernels, sampled kernels or a weight-noise estimator.
- :class:`KernelEncoder`, :class:`KernelDecoder`, :class:`KernelVAE` and
  :func:`kernel_vae_elbo`: the kernel VAE (fully factorised Gaussians, MLPs with ELU).
  The paper's Appendix D and the authors' code use conv / transposed-conv VAEs (hidden 32
  for 7x7, 64 for 5x5, softplus decoder scale); the MLPs are our simplification.
- :class:`DeepWeightPrior`: the trained VAEs of all conv layers as one reusable prior
  object, saved and loaded atomically (:meth:`DeepWeightPrior.save`,
  :meth:`DeepWeightPrior.load`).
- Kernel priors for the target task, all with the same call inside the model:
  :class:`DeepKernelPrior` (the DWP of one layer), :class:`NormalKernelPrior` and
  :class:`LogUniformKernelPrior` (the baselines, with their closed-form or approximate
  KL to a factorised Gaussian).
- :mod:`metaprior.models.dwp.diagnostics`: how tight the auxiliary bound is
  (importance-weighted ``log p(w)`` against the bound), and whether a layer's kernels
  collapsed onto one (the share of their mean kernel; mean-field VI under the prior alone).
- :func:`dwp_model`: the target-task NumPyro model. For every conv layer ``l``, in a
  plate over its kernels, ``z ~ p(z)`` then ``w ~ p_l(w | z)``; then the labels given
  the images. Biases and the dense layer are ``param`` sites: point estimates, with no
  prior, as in the paper.

Shapes: images are ``[N, H, W, C]`` (channels last, as the data loaders give them);
inside the network activations are ``[N, C, H, W]`` and kernels ``[out, in, k, k]``
(Equinox's ``Conv2d`` layout).

References:
    A. Atanov, A. Ashukha, K. Struminsky, D. Vetrov, M. Welling. "The Deep Weight
    Prior." ICLR 2019 (arXiv:1810.06943). Sec. 3 (the prior and the auxiliary bound),
    Sec. 4.1 and Appendix (the MNIST network, source kernels, VAE).
    D. Molchanov, A. Ashukha, D. Vetrov. "Variational Dropout Sparsifies Deep Neural
    Networks." ICML 2017, Eq. (14) (the log-uniform KL approximation).
"""

from metaprior.models.dwp.model import (
    DeepKernelPrior,
    KernelPrior,
    KernelSites,
    LogUniformKernelPrior,
    NormalKernelPrior,
    dwp_model,
    dwp_model_params,
    kernel_sites,
)
from metaprior.models.dwp.net import ConvNet, conv2d, conv2d_im2col, max_pool2, without_kernels
from metaprior.models.dwp.prior import DeepWeightPrior
from metaprior.models.dwp.vae import (
    KernelDecoder,
    KernelEncoder,
    KernelVAE,
    collect_kernels,
    decoder_snr,
    drop_small_kernels,
    kernel_vae_elbo,
)

__all__ = [
    "ConvNet",
    "conv2d",
    "conv2d_im2col",
    "max_pool2",
    "KernelEncoder",
    "KernelDecoder",
    "KernelVAE",
    "kernel_vae_elbo",
    "decoder_snr",
    "collect_kernels",
    "drop_small_kernels",
    "DeepWeightPrior",
    "KernelPrior",
    "DeepKernelPrior",
    "NormalKernelPrior",
    "LogUniformKernelPrior",
    "KernelSites",
    "kernel_sites",
    "dwp_model",
    "dwp_model_params",
    "without_kernels",
]
