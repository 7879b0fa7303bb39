"""Building blocks of PixelCNN++ (Salimans et al., 2017, "PixelCNN++: Improving the PixelCNN with
Discretized Logistic Mixture Likelihood and Other Modifications", arXiv:1701.05517).

The original code is openai/pixel-cnn (`pixel_cnn_pp/nn.py`); this is our own PyTorch rewrite.
Every convolution here is causal in raster order: the output at row i depends on input rows <= i
only (down-shifted), and where noted also on columns <= j only (down-right-shifted). The model
shifts the first layer's output by one pixel so that the prediction for (i, j) never sees (i, j).

Conditioning (gated residual fusion): `GatedResNet` takes an optional per-sample vector `cond`
(the class embedding) and fuses it either as an additive bias on the gate pre-activation
("gated", as in conditional PixelCNN, van den Oord et al. 2016) or as FiLM, a per-channel scale and
shift of the hidden features (Perez et al. 2018).
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


def concat_elu(x):
    """ELU of x and -x stacked on channels, the PixelCNN++ non-linearity: (B, C, H, W) -> (B, 2C, H, W)."""
    return F.elu(torch.cat([x, -x], dim=1))


def concat_elu_padded(x, pad):
    """F.pad(concat_elu(x), pad), pad = (left, right, top, bottom), built in one buffer: the
    padding is zeros either way (elu(0) = 0), and writing x and -x into a zeroed buffer and taking
    the ELU in place saves the concatenated and the padded copies. (B, C, H, W) ->
    (B, 2C, H + top + bottom, W + left + right)."""
    B, C, H, W = x.shape
    left, right, top, bottom = pad
    out = x.new_zeros(B, 2 * C, H + top + bottom, W + left + right)
    out[:, :C, top:top + H, left:left + W] = x
    out[:, C:, top:top + H, left:left + W] = -x
    return F.elu_(out)


def add_pairs(a, b):
    """a + b, where one of them may hold B images and the other n = K * B image-label pairs in
    class-major order (pair k * B + i is image i under the k-th label): the image tensor is
    broadcast over the K labels. That is how work done before the label enters is shared between
    the classes (see PixelCNN.forward). With equal batches, plain a + b. Returns (n, ...)."""
    if a.shape[0] == b.shape[0]:
        return a + b
    images, pairs = (a, b) if a.shape[0] < b.shape[0] else (b, a)
    k = pairs.shape[0] // images.shape[0]
    return (pairs.reshape(k, -1, *pairs.shape[1:]) + images).flatten(0, 1)   # (K * B, ...)


def expand_pairs(t, n):
    """t (B, ...) of B images as n = K * B class-major image-label pairs: t repeated K times
    (t itself when it already has n rows)."""
    return t if t.shape[0] == n else t.repeat(n // t.shape[0], *(1,) * (t.dim() - 1))


def conv_at_one_position(conv, window):
    """The single output of `conv` (no padding) whose receptive field is all of `window`
    (B, C, kh, kw), as one matrix product: on a CPU far cheaper than a convolution call on so small
    an input, which is what the cached sampler computes at every pixel. Returns (B, C_out, 1, 1)."""
    weight = conv.weight.reshape(conv.out_channels, -1)                  # (C_out, C * kh * kw)
    return F.linear(window.reshape(window.shape[0], -1), weight, conv.bias)[:, :, None, None]


def _shift_columns(x, s):
    """y[..., m] = x[..., m + s], zero where m + s falls outside the columns of x."""
    if s == 0:
        return x
    if s > 0:
        return F.pad(x[..., s:], (0, s))
    return F.pad(x[..., :s], (-s, 0))


def down_shift(x):
    """Shift the image down by one row, filling the top row with zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x):
    """Shift the image right by one column, filling the left column with zeros."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class _ShiftedConv2d(nn.Module):
    """A weight-normalised convolution padded on the top (and sides) only, so that it is causal
    in rows: output row r reads input rows r*stride - (fh-1) .. r*stride."""

    def __init__(self, in_channels, out_channels, filter_size, stride, pad):
        super().__init__()
        self.filter_size, self.stride, self.pad = filter_size, stride, pad
        self.conv = weight_norm(nn.Conv2d(in_channels, out_channels, filter_size, stride))

    def forward(self, x, concat_elu_first=False):
        """The convolution of x, or with concat_elu_first of concat_elu(x) (fused with the
        padding): (B, C_in, H, W), or (B, C_in / 2, H, W) -> (B, C_out, H / stride, W / stride)."""
        if concat_elu_first:
            return self.conv(concat_elu_padded(x, self.pad))
        return self.conv(F.pad(x, self.pad))

    def forward_window(self, x, region, concat_elu_first=False):
        """The region ((r0, r1), (c0, c1)) of forward(x, concat_elu_first), reading only the
        input it needs.

        x: the full input (B, C, H, W); concat_elu is applied to what is read.
        Output (i, j) reads padded input rows i*s .. i*s + fh - 1 and columns j*s .. j*s + fw - 1;
        the parts of that window that fall in the padding are zeros here too. Used by the cached
        sampler, which recomputes one row or one pixel of every layer at a time.
        Returns (B, C_out, r1 - r0 + 1, c1 - c0 + 1).
        """
        (r0, r1), (c0, c1) = region
        (fh, fw), s, W = self.filter_size, self.stride[0], x.shape[3]
        left, _, top, _ = self.pad
        y0, y1 = r0 * s - top, r1 * s - top + fh - 1          # input rows read (y1 < H: no bottom pad)
        x0, x1 = c0 * s - left, c1 * s - left + fw - 1        # input columns read
        x = x[:, :, max(y0, 0):y1 + 1, max(x0, 0):min(x1, W - 1) + 1]
        if concat_elu_first:
            x = concat_elu(x)
        pad = (max(0, -x0), max(0, x1 - (W - 1)), max(0, -y0), 0)
        x = F.pad(x, pad) if any(pad) else x
        return conv_at_one_position(self.conv, x) if r0 == r1 and c0 == c1 else self.conv(x)


class DownShiftedConv2d(_ShiftedConv2d):
    """Convolution that sees the current row and the rows above, centred horizontally.

    Padding (left, right, top, bottom) = ((fw-1)/2, (fw-1)/2, fh-1, 0): nothing from below.
    """

    def __init__(self, in_channels, out_channels, filter_size=(2, 3), stride=(1, 1)):
        fh, fw = filter_size
        super().__init__(in_channels, out_channels, filter_size, stride,
                         pad=((fw - 1) // 2, (fw - 1) // 2, fh - 1, 0))


class DownRightShiftedConv2d(_ShiftedConv2d):
    """Convolution that sees the rows above and the columns to the left (and the pixel itself).

    Padding (left, right, top, bottom) = (fw-1, 0, fh-1, 0).
    """

    def __init__(self, in_channels, out_channels, filter_size=(2, 2), stride=(1, 1)):
        fh, fw = filter_size
        super().__init__(in_channels, out_channels, filter_size, stride,
                         pad=(fw - 1, 0, fh - 1, 0))


class _ShiftedDeconv2d(nn.Module):
    """A stride-2 weight-normalised transposed convolution, (H, W) -> (2H, 2W): of its
    (2H + 1, 2W + fw - 1) outputs it keeps the first 2H rows, so that it stays causal in rows, and
    2W columns from `crop_left` on."""

    def __init__(self, in_channels, out_channels, filter_size, stride, crop_left):
        super().__init__()
        if tuple(stride) != (2, 2) or filter_size[0] != 2:
            raise ValueError(f"the row-causal crop and the matrix-product forward assume stride "
                             f"(2, 2) and filter height 2, got stride {tuple(stride)} and filter "
                             f"{tuple(filter_size)}")
        self.filter_size, self.crop_left = filter_size, crop_left
        # dim=1: a transposed convolution stores (in, out, kh, kw), and the paper normalises per
        # output channel.
        self.deconv = weight_norm(
            nn.ConvTranspose2d(in_channels, out_channels, filter_size, stride, output_padding=1),
            dim=1)

    def forward(self, x):
        """(B, C_in, H, W) -> (B, C_out, 2H, 2W): `matrix_product_forward` on a CPU, where it is
        faster, `reference_forward` (the transposed convolution) on other devices: on an NVIDIA
        H200 the matrix product took twice as long as cuDNN's transposed convolution (0.49 ms
        against 0.24, `python bench.py --device cuda --only classification`)."""
        if x.device.type == "cpu":
            return self.matrix_product_forward(x)
        return self.reference_forward(x)

    def matrix_product_forward(self, x):
        """forward(x) as `reference_forward` computes it, but as one matrix product per pixel and a
        rearrangement. Because the filter height equals the stride, each input row feeds two output
        rows of its own; along a row, stride 2 puts each output column's inputs in one parity of
        the filter's columns. On a CPU, PyTorch's transposed convolution (a matrix product, then
        scattered adds) is slower than this at the model's sizes, most under bf16
        (`python bench.py --only classification` times both)."""
        B, _, H, W = x.shape
        weight = self.deconv.weight                          # (C_in, C_out, 2, fw)
        c_out, fh, fw = weight.shape[1:]
        # Every input pixel's contribution to each of the fh * fw filter taps at once.
        taps = F.conv2d(x, weight.permute(1, 2, 3, 0).reshape(c_out * fh * fw, -1, 1, 1))
        taps = taps.view(B, c_out, fh, fw, H, W)
        # Output column 2m + p (after the crop) is uncropped column 2m + p + crop_left = 2q + k:
        # the tap k of input column q = m + (p + crop_left - k) / 2, for each k of that parity.
        bias = self.deconv.bias[:, None, None, None]          # (C_out, 1, 1, 1)
        parities = []
        for p in (0, 1):
            out = bias
            for k in range(fw):
                if (p + self.crop_left - k) % 2 == 0:
                    out = out + _shift_columns(taps[:, :, :, k], (p + self.crop_left - k) // 2)
            parities.append(out)                                # (B, C_out, fh, H, W)
        out = torch.stack(parities, dim=-1)                     # (B, C_out, fh, H, W, 2)
        return out.permute(0, 1, 3, 2, 4, 5).reshape(B, c_out, fh * H, 2 * W)

    def reference_forward(self, x):
        """forward(x) the straightforward way: the transposed convolution, cropped."""
        H, W = x.shape[2:]
        x = self.deconv(x)                                   # (B, C, 2H + 1, 2W + fw - 1)
        return x[:, :, :2 * H, self.crop_left:self.crop_left + 2 * W]      # (B, C, 2H, 2W)

    def forward_window(self, x, region):
        """The region ((r0, r1), (c0, c1)) of forward(x), from the inputs that reach it: output row
        r comes from input row r // 2 alone, and column c from the inputs q with
        0 <= c + crop_left - 2q < fw."""
        (r0, r1), (c0, c1) = region
        fw, W = self.filter_size[1], x.shape[3]
        u0, u1 = c0 + self.crop_left, c1 + self.crop_left     # columns of the uncropped output
        p0, q0, q1 = r0 // 2, max(0, -((fw - 1 - u0) // 2)), min(W - 1, u1 // 2)
        if r0 == r1 and u0 == u1 and q0 == q1:               # one output from one input: (C_in) @ (C_in, C_out)
            weight = self.deconv.weight[:, :, r0 - 2 * p0, u0 - 2 * q0]          # (C_in, C_out)
            return F.linear(x[:, :, p0, q0], weight.t(), self.deconv.bias)[:, :, None, None]
        y = self.deconv(x[:, :, p0:r1 // 2 + 1, q0:q1 + 1])
        return y[:, :, r0 - 2 * p0:r1 - 2 * p0 + 1, u0 - 2 * q0:u1 - 2 * q0 + 1]


class DownShiftedDeconv2d(_ShiftedDeconv2d):
    """Transposed convolution, cropped so that it stays down-shifted (centred horizontally)."""

    def __init__(self, in_channels, out_channels, filter_size=(2, 3), stride=(2, 2)):
        super().__init__(in_channels, out_channels, filter_size, stride,
                         crop_left=(filter_size[1] - 1) // 2)


class DownRightShiftedDeconv2d(_ShiftedDeconv2d):
    """Transposed convolution, cropped so that it stays down-right-shifted."""

    def __init__(self, in_channels, out_channels, filter_size=(2, 2), stride=(2, 2)):
        super().__init__(in_channels, out_channels, filter_size, stride, crop_left=0)


class NIN(nn.Module):
    """Network-in-network: a weight-normalised 1x1 convolution (a per-pixel linear layer)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size=1))

    def forward(self, x):
        return conv_at_one_position(self.conv, x) if x.shape[2:] == (1, 1) else self.conv(x)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on a CPU.

    F.dropout draws one random number per element, and on a CPU that draw is serial: a fifth of
    the CPU preset's training step. Here each 64-bit draw is cut into four 16-bit uniforms, so the
    mask costs a quarter of the draws. An element is kept when its uniform is at least
    k = round(p * 65536) out of 65536 values, so an element is dropped with probability
    k / 65536 (p to within 8e-6), and the kept ones are divided by 1 - k / 65536, the mask in x's
    dtype, as F.dropout does on a CPU. Elsewhere (CUDA, a big-endian CPU, p = 1), in eval mode and
    under torch.compile (which fuses F.dropout's draws) this is F.dropout.
    """

    def forward(self, x):
        if (not self.training or self.p in (0, 1) or x.device.type != "cpu"
                or sys.byteorder != "little" or torch.compiler.is_compiling()):
            return F.dropout(x, self.p, self.training)
        k = round(self.p * 65536)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-2 ** 63, None)                            # all 64 bits uniform
        u = words.view(torch.int16)[:n].view(x.shape)           # uniform on -32768 .. 32767
        keep = (u >= k - 32768).to(x.dtype).div_(1 - k / 65536)   # as F.dropout scales its mask
        return x * keep


class GatedResNet(nn.Module):
    """The PixelCNN++ gated residual block, with optional class conditioning.

        h = conv(concat_elu(x)) [+ nin(concat_elu(a))]       a: skip input from the other stream
        h = concat_elu(h)               -- FiLM: h = h * (1 + gamma(c)) + beta(c)
        h = conv(dropout(h))            -> 2F channels       -- gated: h += W c
        out = x + h[:F] * sigmoid(h[F:])

    Args:
        nr_filters: F, channels in and out.
        conv: DownShiftedConv2d or DownRightShiftedConv2d (the stream this block belongs to).
        skip_channels: channels of the skip input `a` (0 when there is none).
        dropout: dropout probability on the hidden features (the paper uses 0.5).
        cond_dim: size of the conditioning vector, or None for an unconditional block.
        fusion: "gated" (bias on the gate pre-activation) or "film" (scale and shift of the hidden
            features); ignored when cond_dim is None.
    """

    def __init__(self, nr_filters, conv, skip_channels=0, dropout=0.5, cond_dim=None, fusion="gated"):
        super().__init__()
        if fusion not in ("gated", "film"):
            raise ValueError(f"GatedResNet fusion must be 'gated' or 'film', got {fusion!r}")
        self.conv_input = conv(2 * nr_filters, nr_filters)
        self.nin_skip = NIN(2 * skip_channels, nr_filters) if skip_channels else None
        self.dropout = Dropout(dropout)
        self.conv_out = conv(2 * nr_filters, 2 * nr_filters)
        self.cond_proj = None
        if cond_dim is not None:
            self.fusion = fusion
            # gated: a bias for each of the 2F gate pre-activations; film: gamma and beta for each
            # of the 2F hidden channels.
            out = 2 * nr_filters if fusion == "gated" else 4 * nr_filters
            self.cond_proj = nn.Linear(cond_dim, out)
            if fusion == "film":
                # Start as the identity (scale 1, shift 0) so conditioning cannot destabilise
                # early training; the gradient still reaches the projection from step one.
                nn.init.zeros_(self.cond_proj.weight)
                nn.init.zeros_(self.cond_proj.bias)

    def forward(self, x, a=None, cond=None):
        """x: (B, F, H, W); a: the skip input, and cond: (n, cond_dim), each with B rows or with
        n = K * B class-major image-label pairs (see add_pairs). Returns (n, F, H, W): the layers
        before the first input with n rows run once per image."""
        h = self.conv_input(x, concat_elu_first=True)        # (B, F, H, W)
        if a is not None:
            h = add_pairs(h, self.nin_skip(concat_elu(a)))
        if self.training or self._film_on():
            h = self.conv_out(self.dropout(self._film(concat_elu(h), cond)))   # (B or n, 2F, H, W)
        else:   # the same without dropout and FiLM, concat_elu fused with the padding
            h = self.conv_out(h, concat_elu_first=True)
        return add_pairs(x, self._gate(h, cond))

    def forward_window(self, x, region, store, a=None, cond=None):
        """The region ((r0, r1), (c0, c1)) of forward(x, a, cond) in eval mode, for the cached
        sampler.

        x: the block's full input (B, F, H, W), final wherever the region reads it; a: the region
        of the skip input; store(values, region, H, W): writes values into this block's cache of
        hidden features and returns the whole cache, final wherever the region reads it.
        """
        assert not self.training, "forward_window skips dropout: call model.eval() first"
        (r0, r1), (c0, c1) = region
        h = self.conv_input.forward_window(x, region, concat_elu_first=True)   # (B, F, n, m)
        if a is not None:
            h = h + self.nin_skip(concat_elu(a))
        hidden = store(self._film(concat_elu(h), cond), region, *x.shape[2:])  # (B, 2F, H, W)
        return x[:, :, r0:r1 + 1, c0:c1 + 1] + self._gate(
            self.conv_out.forward_window(hidden, region), cond)

    def _film_on(self):
        return self.cond_proj is not None and self.fusion == "film"

    def _film(self, h, cond):
        if not self._film_on():
            return h
        gamma, beta = self.cond_proj(cond)[:, :, None, None].chunk(2, dim=1)   # (B, 2F, 1, 1) each
        return expand_pairs(h, gamma.shape[0]) * (1 + gamma) + beta

    def _gate(self, h, cond):
        """(B, 2F, H, W) -> (B, F, H, W): the value half times the sigmoid of the gate half."""
        if self.cond_proj is not None and self.fusion == "gated":
            h = add_pairs(h, self.cond_proj(cond)[:, :, None, None])
        value, gate = h.chunk(2, dim=1)                      # (B, F, H, W) each
        return value * torch.sigmoid(gate)
