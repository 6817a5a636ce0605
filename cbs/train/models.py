"""Flax models and their losses: MLP, small CNN, the MNIST-1D paper's CNN, small
decoder-only Transformer.

The MNIST-1D paper's models: its MLP is ``mlp`` with ``width: 100, depth: 2``; its CNN is
``mnist1d_cnn`` with ``width: 25, depth: 3``; its logistic regression is ``mlp`` with
``depth: 0``. (Initialisation is Flax's: LeCun-normal kernels and zero biases, where the
paper's PyTorch layers draw both uniformly in +-1/sqrt(fan_in).)

Sizes come from the config (``width``, ``depth``). Every model maps a batch of inputs to
logits (classification, LM) or predictions (regression); :func:`loss_and_error` turns
them into the per-batch mean loss and error rate, the quantities the back end evaluates.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["MLP", "CNN", "MNIST1DCNN", "Transformer", "make_model", "loss_and_error"]


class MLP(nn.Module):
    """``depth`` hidden ReLU layers of ``width`` units (depth 0 = a linear model)."""

    width: int
    depth: int
    num_outputs: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.num_outputs)(x)


class CNN(nn.Module):
    """``depth`` 3-wide (or 3x3) ReLU convolutions of ``width`` channels, stride 2 after
    the first, global average pooling and a linear read-out. Works on 1-D signals
    (length, channels) and images (height, width, channels)."""

    width: int
    depth: int
    num_outputs: int

    @nn.compact
    def __call__(self, x):
        spatial = x.ndim - 2
        for i in range(self.depth):
            stride = 1 if i == 0 else 2
            x = nn.relu(nn.Conv(self.width, (3,) * spatial, strides=(stride,) * spatial)(x))
        x = x.mean(axis=tuple(range(1, 1 + spatial)))
        return nn.Dense(self.num_outputs)(x)


# Not folded into CNN: the MNIST-1D paper's model, written as published (its kernel
# widths, strides, padding and flatten read-out differ from CNN's, and must stay so).
class MNIST1DCNN(nn.Module):
    """The MNIST-1D paper's CNN (Greydanus 2020, ``mnist1d/models.py`` ``ConvBase``):
    ``depth`` ReLU convolutions of ``width`` channels, all stride 2 with padding 1, the
    first 5 wide and the others 3 wide, then flatten and a linear read-out. The paper's
    model is ``width=25, depth=3`` (40 -> 19 -> 10 -> 5 positions, 125 features). Works on
    1-D signals (length, channels) and on images (square windows)."""

    width: int
    depth: int
    num_outputs: int

    @nn.compact
    def __call__(self, x):
        spatial = x.ndim - 2
        for i in range(self.depth):
            k = 5 if i == 0 else 3
            x = nn.relu(
                nn.Conv(
                    self.width, (k,) * spatial, strides=(2,) * spatial, padding=[(1, 1)] * spatial
                )(x)
            )
        return nn.Dense(self.num_outputs)(x.reshape(x.shape[0], -1))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm Transformer block: causal self-attention then a 4x GELU MLP."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width)(
            h, h, mask=mask
        )
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(h)))
        return x + h


class Transformer(nn.Module):
    """Decoder-only Transformer over tokens: learned position embeddings, ``depth``
    pre-LN blocks of ``width`` with ``heads`` heads, untied read-out."""

    width: int
    depth: int
    num_outputs: int  # vocabulary size
    seq_len: int
    heads: int = 4

    @nn.compact
    def __call__(self, tokens):
        t = tokens.shape[1]
        x = nn.Embed(self.num_outputs, self.width)(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.seq_len, self.width))
        x = x + pos[:t]
        mask = nn.make_causal_mask(tokens)
        for i in range(self.depth):
            # explicit names keep the parameter paths (and the init RNG folded from them)
            # those of the class's former name Block
            x = TransformerBlock(self.width, self.heads, name=f"Block_{i}")(x, mask)
        return nn.Dense(self.num_outputs)(nn.LayerNorm()(x))


def make_model(
    kind: str, width: int, depth: int, num_outputs: int, seq_len: int = 0, heads: int = 4
) -> nn.Module:
    """The Flax module for a config's ``train.model``."""
    if kind == "mlp":
        return MLP(width, depth, num_outputs)
    if kind == "cnn":
        return CNN(width, depth, num_outputs)
    if kind == "mnist1d_cnn":
        return MNIST1DCNN(width, depth, num_outputs)
    if kind == "transformer":
        return Transformer(width, depth, num_outputs, seq_len, heads)
    raise ValueError(f"unknown model {kind!r}")


def loss_and_error(task: str, outputs: jax.Array, y: jax.Array, register_kfac: bool = False):
    """Mean loss and error rate of a batch.

    Classification and LM: softmax cross-entropy (mean over examples and positions) and
    the top-1 error rate. Regression: 0.5 * squared error, and the error is NaN (not
    defined; ``check`` rejects a val_error target for regression).

    Args:
      task: "classification", "lm" or "regression".
      outputs: model outputs.
      y: integer labels / next tokens, or float targets.
      register_kfac: register the loss with kfac-jax (only inside a K-FAC loss function).

    ``task`` may also be a :class:`cbs.train.user.CustomLoss` (``train.loss``), whose
    function returns both numbers itself.
    """
    if not isinstance(task, str):
        return task.batch(outputs, y)
    if task == "regression":
        if register_kfac:
            import kfac_jax

            kfac_jax.register_squared_error_loss(outputs, y)
        return 0.5 * jnp.mean(jnp.sum((outputs - y) ** 2, axis=-1)), jnp.nan
    if register_kfac:
        import kfac_jax

        kfac_jax.register_softmax_cross_entropy_loss(
            outputs.reshape(-1, outputs.shape[-1]), y.reshape(-1)
        )
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean()
    err = jnp.mean(jnp.argmax(outputs, axis=-1) != y)
    return loss, err
