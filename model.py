"""The conditional PixelCNN++ (Salimans et al., 2017, arXiv:1701.05517), conditioned on a class
label through a learned embedding and gated residual fusion.

Input: images in [-1, 1], layout (B, C, H, W), C = 3 (RGB) or 1, H and W divisible by 4; labels
int64 (B,). Output: the parameters of a discretized logistic mixture with K = nr_logistic_mix
components per pixel, (B, 10 * K, H, W) for RGB, in the channel layout of the reference code:

    [K mixture logits | for each colour: K means, K log-scales, K colour coefficients]

10 = 1 logit + 3 colours x (mean, log-scale, coefficient). For one channel it is 3 * K
(logit, mean, log-scale). utils.discretized_mix_logistic_loss turns this into log p(x | c).

    >>> model = PixelCNN(nr_resnet=1, nr_filters=40, nr_logistic_mix=5)
    >>> model(torch.zeros(2, 3, 32, 32), torch.tensor([0, 3])).shape
    torch.Size([2, 50, 32, 32])

The network is a U-Net of two streams: `u` sees the rows above, `ul` the rows above and the
pixels to the left. The up pass runs three stages of `nr_resnet` gated blocks with two stride-2
downsamplings (32 -> 16 -> 8); the down pass mirrors it and consumes the up pass's outputs as skip
inputs.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import (NIN, DownRightShiftedConv2d, DownRightShiftedDeconv2d, DownShiftedConv2d,
                    DownShiftedDeconv2d, GatedResNet, down_shift, right_shift)

# Where the class embedding enters the network, for each `fusion` value.
FUSION_MODES = {
    "none": (),                             # unconditional: labels are ignored
    "early": ("early",),                    # added to both streams after the first convolutions
    "gated": ("gated",),                    # a bias on every gated block's gate pre-activation
    "film": ("film",),                      # scale and shift of every gated block's hidden features
    "late": ("late",),                      # added before the output layer
    "joint": ("early", "gated", "late"),
}


def mixture_channels(input_channels, nr_logistic_mix):
    """Output channels of the mixture: per component a logit plus (mean, log-scale, coefficient)
    per colour for RGB, or (mean, log-scale) for one channel."""
    if input_channels == 3:
        return 10 * nr_logistic_mix
    if input_channels == 1:
        return 3 * nr_logistic_mix
    raise ValueError(f"input_channels must be 1 or 3, got {input_channels}")


class PixelCNN(nn.Module):
    """Class-conditional PixelCNN++.

    Args:
        nr_resnet: gated residual blocks per stage (the paper: 5).
        nr_filters: channels of both streams (the paper: 160).
        nr_logistic_mix: K, mixture components per pixel (the paper: 10).
        input_channels: 3 for RGB, 1 for grayscale.
        num_classes: number of labels the embedding knows.
        fusion: one of FUSION_MODES.
        dropout: dropout probability inside the gated blocks (the paper: 0.5).
        embed_dim: size of the class embedding (default: nr_filters).

    The constructor arguments travel with the weights as the module's extra state, so a saved
    state_dict rebuilds the model by itself (see `from_state_dict`), and loading weights into a
    model of another architecture fails with a message that names both.
    """

    def __init__(self, nr_resnet=5, nr_filters=160, nr_logistic_mix=10, input_channels=3,
                 num_classes=4, fusion="gated", dropout=0.5, embed_dim=None):
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {sorted(FUSION_MODES)}, got {fusion!r}")
        embed_dim = embed_dim or nr_filters
        self.config = dict(nr_resnet=nr_resnet, nr_filters=nr_filters,
                           nr_logistic_mix=nr_logistic_mix, input_channels=input_channels,
                           num_classes=num_classes, fusion=fusion, dropout=dropout,
                           embed_dim=embed_dim)
        self.nr_logistic_mix = nr_logistic_mix
        self.input_channels = input_channels
        self.num_classes = num_classes
        places = FUSION_MODES[fusion]
        self.embedding = nn.Embedding(num_classes, embed_dim) if places else None
        self.early_proj = nn.Linear(embed_dim, 2 * nr_filters) if "early" in places else None
        self.late_proj = nn.Linear(embed_dim, nr_filters) if "late" in places else None
        block_fusion = next((p for p in places if p in ("gated", "film")), None)
        cond_dim = embed_dim if block_fusion else None

        def u_block(skip):
            return GatedResNet(nr_filters, DownShiftedConv2d, skip * nr_filters, dropout,
                               cond_dim, block_fusion or "gated")

        def ul_block(skip):
            return GatedResNet(nr_filters, DownRightShiftedConv2d, skip * nr_filters, dropout,
                               cond_dim, block_fusion or "gated")

        # +1 input channel of ones, so the network can tell zero padding from black pixels.
        c_in = input_channels + 1
        self.u_init = DownShiftedConv2d(c_in, nr_filters, filter_size=(2, 3))
        self.ul_init_up = DownShiftedConv2d(c_in, nr_filters, filter_size=(1, 3))
        self.ul_init_left = DownRightShiftedConv2d(c_in, nr_filters, filter_size=(2, 1))

        self.up_u = nn.ModuleList(
            [nn.ModuleList([u_block(0) for _ in range(nr_resnet)]) for _ in range(3)])
        self.up_ul = nn.ModuleList(
            [nn.ModuleList([ul_block(1) for _ in range(nr_resnet)]) for _ in range(3)])
        self.downsize_u = nn.ModuleList(
            [DownShiftedConv2d(nr_filters, nr_filters, stride=(2, 2)) for _ in range(2)])
        self.downsize_ul = nn.ModuleList(
            [DownRightShiftedConv2d(nr_filters, nr_filters, stride=(2, 2)) for _ in range(2)])

        # The down pass takes one more block per stage after the first, to consume the outputs of
        # the two downsampling layers as skip inputs: 3 * nr_resnet + 2 skips in all.
        down_nr = [nr_resnet, nr_resnet + 1, nr_resnet + 1]
        self.down_u = nn.ModuleList(
            [nn.ModuleList([u_block(1) for _ in range(n)]) for n in down_nr])
        self.down_ul = nn.ModuleList(
            [nn.ModuleList([ul_block(2) for _ in range(n)]) for n in down_nr])
        self.upsize_u = nn.ModuleList(
            [DownShiftedDeconv2d(nr_filters, nr_filters) for _ in range(2)])
        self.upsize_ul = nn.ModuleList(
            [DownRightShiftedDeconv2d(nr_filters, nr_filters) for _ in range(2)])

        self.nin_out = NIN(nr_filters, mixture_channels(input_channels, nr_logistic_mix))

    def label_parameter_names(self):
        """Names of the parameters that act only through the label: the class embedding and the
        weights that project it into the network. (The projections' biases act on every class
        alike, so they count with the rest of the network.)"""
        return [name for name, _ in self.named_parameters()
                if name == "embedding.weight" or name.endswith("proj.weight")]

    def forward(self, x, labels):
        """x: (B, C, H, W) in [-1, 1]; labels: int64 (B,). Returns (B, mixture channels, H, W)."""
        cond = self.embedding(labels) if self.embedding is not None else None   # (B, E)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)                   # (B, C+1, H, W)
        u = down_shift(self.u_init(x))                                           # (B, F, H, W)
        ul = down_shift(self.ul_init_up(x)) + right_shift(self.ul_init_left(x))
        if self.early_proj is not None:
            early_u, early_ul = self.early_proj(cond)[:, :, None, None].chunk(2, dim=1)
            u, ul = u + early_u, ul + early_ul

        u_skips, ul_skips = [u], [ul]
        for stage in range(3):
            for u_blk, ul_blk in zip(self.up_u[stage], self.up_ul[stage]):
                u = u_blk(u, cond=cond)
                ul = ul_blk(ul, a=u, cond=cond)
                u_skips.append(u)
                ul_skips.append(ul)
            if stage < 2:
                u = self.downsize_u[stage](u)                                    # (B, F, H/2, W/2)
                ul = self.downsize_ul[stage](ul)
                u_skips.append(u)
                ul_skips.append(ul)

        u, ul = u_skips.pop(), ul_skips.pop()
        for stage in range(3):
            for u_blk, ul_blk in zip(self.down_u[stage], self.down_ul[stage]):
                u = u_blk(u, a=u_skips.pop(), cond=cond)
                ul = ul_blk(ul, a=torch.cat([u, ul_skips.pop()], dim=1), cond=cond)
            if stage < 2:
                u = self.upsize_u[stage](u)                                      # (B, F, 2H, 2W)
                ul = self.upsize_ul[stage](ul)

        if self.late_proj is not None:
            ul = ul + self.late_proj(cond)[:, :, None, None]
        return self.nin_out(F.elu(ul))

    def forward_rows(self, cache, lo, hi, u_cached=False):
        """Rows lo..hi of forward(cache.x, labels), recomputing only those rows of every layer
        (and the matching rows at 1/2 and 1/4 resolution) from the cached rows above.

        The reference `forward` stays the straightforward path; this one serves the cached sampler
        (`utils.sample_fast`), and tests hold the two equal. Valid when every layer's rows above
        `lo` are final, which holds when the caller moves down the image in raster order and
        recomputes rows lo = i - 1 .. i on the first pixel of each row i. The `u` stream sees only
        the rows above, so within a row it does not change: u_cached=True reuses it.
        Returns (B, mixture channels, hi - lo + 1, W).
        """
        x, cond, H = cache.x, cache.cond, cache.x.shape[2]

        def band(f):
            return lo // f, hi // f

        def run_u(key, compute, r0, height):
            """The u stream's output for `key`: from the cache, or recomputed at rows r0.."""
            return cache[key] if u_cached else cache.store(key, compute(), r0, height)

        r0, r1 = band(1)

        early_u, early_ul = (self.early_proj(cond)[:, :, None, None].chunk(2, dim=1)
                             if self.early_proj is not None else (0, 0))       # (B, F, 1, 1) each

        def u_init_rows():
            u_init = cache.store("u_init", self.u_init.forward_rows(x, r0, r1), r0, H)
            return _down_shift_rows(u_init, r0, r1) + early_u                  # (B, F, n, W)

        u = run_u("u", u_init_rows, r0, H)                                      # (B, F, H, W)
        ul_up = cache.store("ul_up", self.ul_init_up.forward_rows(x, r0, r1), r0, H)
        ul = (_down_shift_rows(ul_up, r0, r1) + right_shift(self.ul_init_left.forward_rows(x, r0, r1))
              + early_ul)
        ul = cache.store("ul", ul, r0, H)

        u_skips, ul_skips = [u], [ul]
        for stage in range(3):
            r0, r1 = band(2 ** stage)
            h = H >> stage
            for u_blk, ul_blk in zip(self.up_u[stage], self.up_ul[stage]):
                u = run_u(u_blk, lambda: u_blk.forward_rows(u, r0, r1, cache.store_for(u_blk),
                                                            cond=cond), r0, h)
                ul = cache.store(ul_blk, ul_blk.forward_rows(ul, r0, r1, cache.store_for(ul_blk),
                                                             u[:, :, r0:r1 + 1], cond), r0, h)
                u_skips.append(u)
                ul_skips.append(ul)
            if stage < 2:
                q0, q1 = band(2 ** (stage + 1))
                down_u, down_ul = self.downsize_u[stage], self.downsize_ul[stage]
                u = run_u(down_u, lambda: down_u.forward_rows(u, q0, q1), q0, h // 2)
                ul = cache.store(down_ul, down_ul.forward_rows(ul, q0, q1), q0, h // 2)
                u_skips.append(u)
                ul_skips.append(ul)

        u, ul = u_skips.pop(), ul_skips.pop()
        for stage in range(3):
            r0, r1 = band(4 >> stage)
            h = H // (4 >> stage)
            for u_blk, ul_blk in zip(self.down_u[stage], self.down_ul[stage]):
                a_u = u_skips.pop()[:, :, r0:r1 + 1]
                u = run_u(u_blk, lambda: u_blk.forward_rows(u, r0, r1, cache.store_for(u_blk),
                                                            a_u, cond), r0, h)
                a_ul = torch.cat([u[:, :, r0:r1 + 1], ul_skips.pop()[:, :, r0:r1 + 1]], dim=1)
                ul = cache.store(ul_blk, ul_blk.forward_rows(ul, r0, r1, cache.store_for(ul_blk),
                                                             a_ul, cond), r0, h)
            if stage < 2:
                q0, q1 = band(2 >> stage)
                up_u, up_ul = self.upsize_u[stage], self.upsize_ul[stage]
                u = run_u(up_u, lambda: up_u.forward_rows(u, q0, q1), q0, 2 * h)
                ul = cache.store(up_ul, up_ul.forward_rows(ul, q0, q1), q0, 2 * h)

        ul = ul[:, :, lo:hi + 1]
        if self.late_proj is not None:
            ul = ul + self.late_proj(cond)[:, :, None, None]
        return self.nin_out(F.elu(ul))

    def get_extra_state(self):
        return dict(self.config)

    def set_extra_state(self, state):
        # Dropout does not change the weights' layout, so a checkpoint loads whatever it was.
        if _architecture(state) != _architecture(self.config):
            raise ValueError(
                f"checkpoint was saved from PixelCNN({_format(state)}) but this model is "
                f"PixelCNN({_format(self.config)}); rebuild it with PixelCNN.from_state_dict")

    @classmethod
    def from_state_dict(cls, state_dict):
        """Rebuild the model from a state_dict saved by this class: no architecture flags needed."""
        config = state_dict.get("_extra_state")
        if not isinstance(config, dict):
            raise ValueError("state_dict has no PixelCNN config (_extra_state); it was not saved "
                             "by this codebase's PixelCNN")
        model = cls(**config)
        model.load_state_dict(state_dict)
        return model


class RowCache:
    """What `PixelCNN.forward_rows` keeps between calls: the input x (B, C+1, H, W) with its
    channel of ones, the class embedding, and the full-size output of every layer, by layer."""

    def __init__(self, model, x, labels):
        self.x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)             # (B, C+1, H, W)
        self.cond = model.embedding(labels) if model.embedding is not None else None
        self.layers = {}

    def __getitem__(self, key):
        return self.layers[key]

    def store(self, key, rows, r0, height):
        """Write `rows` at row r0 of the cached output of `key` and return the whole of it."""
        if key not in self.layers:
            self.layers[key] = rows.new_zeros(*rows.shape[:2], height, rows.shape[3])
        full = self.layers[key]
        full[:, :, r0:r0 + rows.shape[2]] = rows
        return full

    def store_for(self, block):
        """The `store` a GatedResNet uses for its hidden features."""
        return lambda rows, r0, height: self.store((block, "hidden"), rows, r0, height)


def _down_shift_rows(full, r0, r1):
    """Rows r0..r1 of down_shift(full), read from rows r0-1..r1-1."""
    rows = full[:, :, max(r0 - 1, 0):r1]
    return F.pad(rows, (0, 0, 1, 0)) if r0 == 0 else rows


def _architecture(config):
    return {k: v for k, v in config.items() if k != "dropout"}


def _format(config):
    return ", ".join(f"{k}={v!r}" for k, v in config.items())
