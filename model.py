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

import math
import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import one_line
from layers import (NIN, DownRightShiftedConv2d, DownRightShiftedDeconv2d, DownShiftedConv2d,
                    DownShiftedDeconv2d, GatedResNet, add_pairs, down_shift, expand_pairs,
                    right_shift)

CHECKPOINT_NAME = "conditional_pixelcnn.pth"        # the file the course's evaluation scripts load
DEFAULT_CHECKPOINT = f"models/{CHECKPOINT_NAME}"   # where pcnn_train.py writes it by default

# Where the class embedding enters the network, for each `fusion` value.
FUSION_MODES = {
    "none": (),                             # unconditional: labels are ignored
    "early": ("early",),                    # added to both streams after the first convolutions
    "gated": ("gated",),                    # a bias on every gated block's gate pre-activation
    "gated_last": ("gated_last",),          # the same on the last stage's blocks only (below)
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
        # "gated_last" conditions only the down pass's last stage, at full resolution: when every
        # class is scored, all the layers before it run once per image (see `forward`).
        block_fusion = next((p for p in places if p in ("gated", "film", "gated_last")), None)
        last_only = block_fusion == "gated_last"

        def block(conv, skip, last_stage):
            conditioned = block_fusion is not None and (last_stage or not last_only)
            return GatedResNet(nr_filters, conv, skip * nr_filters, dropout,
                               embed_dim if conditioned else None,
                               "film" if block_fusion == "film" else "gated")

        def u_block(skip, last_stage=False):
            return block(DownShiftedConv2d, skip, last_stage)

        def ul_block(skip, last_stage=False):
            return block(DownRightShiftedConv2d, skip, last_stage)

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
            [nn.ModuleList([u_block(1, stage == 2) for _ in range(n)])
             for stage, n in enumerate(down_nr)])
        self.down_ul = nn.ModuleList(
            [nn.ModuleList([ul_block(2, stage == 2) for _ in range(n)])
             for stage, n in enumerate(down_nr)])
        self.upsize_u = nn.ModuleList(
            [DownShiftedDeconv2d(nr_filters, nr_filters) for _ in range(2)])
        self.upsize_ul = nn.ModuleList(
            [DownRightShiftedDeconv2d(nr_filters, nr_filters) for _ in range(2)])

        self.nin_out = NIN(nr_filters, mixture_channels(input_channels, nr_logistic_mix))
        # log pi(c) of the Bayes classifier argmax_c log p(x | c) + log pi(c): uniform until
        # `utils.fit_class_log_prior` sets it (pcnn_train.py does, after training). It is not
        # part of the density: sampling and bits/dim never read it.
        self.register_buffer("class_log_prior", self.uniform_log_prior())

    def uniform_log_prior(self):
        """log pi(c) = -log(num_classes) for every class: (num_classes,)."""
        return torch.full((self.num_classes,), -math.log(self.num_classes))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints saved before the prior existed load with the uniform prior they assumed.
        state_dict.setdefault(prefix + "class_log_prior", self.uniform_log_prior())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, labels):
        """x: (B, C, H, W) in [-1, 1]; labels: int64 (n,). Returns (n, mixture channels, H, W).

        With n = B, image i goes with labels[i]. With n = K * B, the output holds K * B
        image-label pairs in class-major order, pair k * B + i being image i under
        labels[k * B + i] (as `utils.class_log_likelihoods` lays out every class): it equals
        forward(x.repeat(K, 1, 1, 1), labels), but the layers before the label first enters run
        once per image (with gated fusion, the first convolutions and the first u-stream block;
        with gated_last, everything before the last stage of the down pass).
        """
        if x.shape[0] == 0 or labels.shape[0] % x.shape[0]:
            raise ValueError(f"labels ({labels.shape[0]}) must be a multiple of the images "
                             f"({x.shape[0]}): one label per image, or K per image class-major")
        cond = self.embedding(labels) if self.embedding is not None else None   # (n, E)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)                   # (B, C+1, H, W)
        u = down_shift(self.u_init(x))                                           # (B, F, H, W)
        ul = down_shift(self.ul_init_up(x)) + right_shift(self.ul_init_left(x))
        if self.early_proj is not None:
            early_u, early_ul = self.early_proj(cond)[:, :, None, None].chunk(2, dim=1)
            u, ul = add_pairs(u, early_u), add_pairs(ul, early_ul)

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
            u, ul = self._down_stage(stage, u, ul, u_skips, ul_skips, cond)
            if stage < 2:
                u = self.upsize_u[stage](u)                                      # (B, F, 2H, 2W)
                ul = self.upsize_ul[stage](ul)
        if self.late_proj is not None:
            ul = add_pairs(ul, self.late_proj(cond)[:, :, None, None])
        return expand_pairs(self.mixture(ul), labels.shape[0])                  # (n, ., H, W)

    def _down_stage(self, stage, u, ul, u_skips, ul_skips, cond):
        """The blocks of the down pass's `stage`, consuming their skip inputs from the ends of
        u_skips and ul_skips."""
        for u_blk, ul_blk in zip(self.down_u[stage], self.down_ul[stage]):
            u = u_blk(u, a=u_skips.pop(), cond=cond)
            ul_skip = ul_skips.pop()
            n = max(u.shape[0], ul_skip.shape[0])
            ul = ul_blk(ul, a=torch.cat([expand_pairs(u, n), expand_pairs(ul_skip, n)], dim=1),
                        cond=cond)
        return u, ul

    def forward_region(self, cache, rows, cols, streams=("u", "ul")):
        """Rows rows[0]..rows[1] and columns cols[0]..cols[1] of forward(cache.x, labels),
        recomputing only that region of every layer (and, at 1/2 and 1/4 resolution, those of its
        positions that lie on the coarser grid) and reading everything else from the cache.

        The reference `forward` stays the straightforward path; this one serves the cached sampler
        (`utils.sample_fast`), and tests hold the two equal. Valid when every layer is cached and
        final wherever the region reads it, which holds when the caller moves through the image in
        raster order: the `u` stream sees only the rows above, so it runs once per row
        (streams=("u",) on the row), and the `ul` stream once per pixel (streams=("ul",) on the
        pixel). A position (p, q) at 1/f resolution is computed with the full-resolution position
        (f*p, f*q): that is when the last pixel it depends on is in place.
        Returns (B, mixture channels, rows, cols) when "ul" is in streams, else None.
        """
        x, cond = cache.x, cache.cond
        H, W = x.shape[2:]
        (lo, hi), (c0, c1) = rows, cols

        def region(f):
            """The positions at 1/f resolution that this call computes, or None."""
            r, c = (-(-lo // f), hi // f), (-(-c0 // f), c1 // f)
            return (r, c) if r[0] <= r[1] and c[0] <= c[1] else None

        regions = {f: region(f) for f in (1, 2, 4)}

        def run(stream, key, f, compute):
            """The full output of layer `key` at 1/f resolution, its region recomputed by
            compute(region) if this call runs `stream` there (None if never computed yet)."""
            if stream in streams and regions[f] is not None:
                return cache.store(key, compute(regions[f]), regions[f], H // f, W // f)
            return cache.layers.get(key)

        early_u, early_ul = (self.early_proj(cond)[:, :, None, None].chunk(2, dim=1)
                             if self.early_proj is not None else (0, 0))       # (B, F, 1, 1) each
        u = run("u", "u", 1, lambda reg: _shifted_window(self.u_init, x, reg, 1, 0) + early_u)
        ul = run("ul", "ul", 1, lambda reg: _shifted_window(self.ul_init_up, x, reg, 1, 0)
                 + _shifted_window(self.ul_init_left, x, reg, 0, 1) + early_ul)

        u_skips, ul_skips = [u], [ul]
        for stage in range(3):
            f = 2 ** stage
            for u_blk, ul_blk in zip(self.up_u[stage], self.up_ul[stage]):
                u = run("u", u_blk, f, lambda reg: u_blk.forward_window(
                    u, reg, cache.store_for(u_blk), cond=cond))
                ul = run("ul", ul_blk, f, lambda reg: ul_blk.forward_window(
                    ul, reg, cache.store_for(ul_blk), _window(u, reg), cond))
                u_skips.append(u)
                ul_skips.append(ul)
            if stage < 2:
                down_u, down_ul = self.downsize_u[stage], self.downsize_ul[stage]
                u = run("u", down_u, 2 * f, lambda reg: down_u.forward_window(u, reg))
                ul = run("ul", down_ul, 2 * f, lambda reg: down_ul.forward_window(ul, reg))
                u_skips.append(u)
                ul_skips.append(ul)

        u, ul = u_skips.pop(), ul_skips.pop()
        for stage in range(3):
            f = 4 >> stage
            for u_blk, ul_blk in zip(self.down_u[stage], self.down_ul[stage]):
                u_skip, ul_skip = u_skips.pop(), ul_skips.pop()
                u = run("u", u_blk, f, lambda reg: u_blk.forward_window(
                    u, reg, cache.store_for(u_blk), _window(u_skip, reg), cond))
                ul = run("ul", ul_blk, f, lambda reg: ul_blk.forward_window(
                    ul, reg, cache.store_for(ul_blk),
                    torch.cat([_window(u, reg), _window(ul_skip, reg)], dim=1), cond))
            if stage < 2:
                up_u, up_ul = self.upsize_u[stage], self.upsize_ul[stage]
                u = run("u", up_u, f // 2, lambda reg: up_u.forward_window(u, reg))
                ul = run("ul", up_ul, f // 2, lambda reg: up_ul.forward_window(ul, reg))

        if "ul" not in streams or regions[1] is None:
            return None
        ul = _window(ul, regions[1])
        if self.late_proj is not None:
            ul = ul + self.late_proj(cond)[:, :, None, None]
        return self.mixture(ul)

    def forward_step(self, cache, ci, cj=None):
        """One step of the cached sampler on an `IndexedCache`, at the position `cache.move_to` set:
        with cj None the `u` stream on row i, as forward_region(cache, (i, i), (0, W - 1), ("u",))
        computes it (returns None), else the `ul` stream at pixel (i, j), as
        forward_region(cache, (i, i), (j, j), ("ul",)) does (returns (B, mixture channels, 1, 1)).

        ci, cj: `position_class` of i and j. The class fixes what the step computes (the
        resolutions whose grid the position is on, the taps of the upsampling layers); the
        position itself enters only through the cache's index tensors. So a step launches the same
        kernels with the same arguments at every position of its class, and a CUDA graph captured
        at one position replays at all the others: nine graphs for the pixels, three for the rows
        (`utils.sample_fast`). Python slicing by (i, j), as forward_region does, would bake the
        position into the graph.

        Each layer reads the patch of its input around the position (`IndexedCache.patch`: rows
        p-2..p and columns q-2..q+1, or the whole of rows p-2..p, p and q the position at the
        input's resolution) and runs its own `forward_window` on it, so the arithmetic is
        forward_region's. The position is patch position (2, 2) for a layer of stride 1, (1, 1)
        for a downsampling one (it reads input rows 2p-1..2p: the unread row p-2 of the patch
        makes its stride fit), and (4 + p % 2, 4 + q % 2) for an upsampling one (it reads input
        (p // 2, q // 2)).
        """
        row = cj is None
        stream, cj = ("u", 0) if row else ("ul", cj)
        W, cond = cache.x.shape[3], cache.cond

        def here(f, r=2, c=2):
            """Patch position (r, c) at 1/f resolution as a region, the whole row for a row step."""
            return (r, r), ((0, W // f - 1) if row else (c, c))

        def run(s, key, f, compute):
            """Store compute() as layer `key`'s output at the position if this step runs stream
            `s` at 1/f resolution; return the key, which later layers read by."""
            if s == stream and ci % f == 0 and cj % f == 0:
                cache.put(key, f, compute(), row)
            return key

        def patch(key, f):
            return cache.patch(key, f, row)

        def at(key, f):
            return cache.at(key, f, row)

        def store(block, f):
            """A GatedResNet's `store`: write its hidden features, return their patch."""
            def write_and_read(values, region, height, width):
                cache.put((block, "hidden"), f, values, row)
                return patch((block, "hidden"), f)
            return write_and_read

        early_u, early_ul = (self.early_proj(cond)[:, :, None, None].chunk(2, dim=1)
                             if self.early_proj is not None else (0, 0))       # (B, F, 1, 1) each
        x = patch("x", 1)                                                 # (B, C+1, 3, 4 or W)
        # The channel of ones is 0 in the margins: 1 where the row above (the column to the left)
        # is in the image, 0 where down_shift (right_shift) shifts in zeros.
        above, left = (x[:, -1:, 1:2, :1] if row else x[:, -1:, 1:2, 2:3]), x[:, -1:, 2:3, 1:2]
        u = run("u", "u", 1, lambda: _shifted_window(self.u_init, x, here(1), 1, 0) * above
                + early_u)
        ul = run("ul", "ul", 1, lambda: _shifted_window(self.ul_init_up, x, here(1), 1, 0) * above
                 + _shifted_window(self.ul_init_left, x, here(1), 0, 1) * left + early_ul)

        u_skips, ul_skips = [u], [ul]
        for stage in range(3):
            f = 2 ** stage
            for u_blk, ul_blk in zip(self.up_u[stage], self.up_ul[stage]):
                u = run("u", u_blk, f, lambda: u_blk.forward_window(
                    patch(u, f), here(f), store(u_blk, f), cond=cond))
                ul = run("ul", ul_blk, f, lambda: ul_blk.forward_window(
                    patch(ul, f), here(f), store(ul_blk, f), at(u, f), cond))
                u_skips.append(u)
                ul_skips.append(ul)
            if stage < 2:
                down_u, down_ul = self.downsize_u[stage], self.downsize_ul[stage]
                u = run("u", down_u, 2 * f, lambda: down_u.forward_window(patch(u, f),
                                                                          here(2 * f, 1, 1)))
                ul = run("ul", down_ul, 2 * f, lambda: down_ul.forward_window(patch(ul, f),
                                                                              here(2 * f, 1, 1)))
                u_skips.append(u)
                ul_skips.append(ul)

        u, ul = u_skips.pop(), ul_skips.pop()
        for stage in range(3):
            f = 4 >> stage
            for u_blk, ul_blk in zip(self.down_u[stage], self.down_ul[stage]):
                u_skip, ul_skip = u_skips.pop(), ul_skips.pop()
                u = run("u", u_blk, f, lambda: u_blk.forward_window(
                    patch(u, f), here(f), store(u_blk, f), at(u_skip, f), cond))
                ul = run("ul", ul_blk, f, lambda: ul_blk.forward_window(
                    patch(ul, f), here(f), store(ul_blk, f),
                    torch.cat([at(u, f), at(ul_skip, f)], dim=1), cond))
            if stage < 2:
                up_u, up_ul, g = self.upsize_u[stage], self.upsize_ul[stage], f // 2
                tap = here(g, 4 + ci // g % 2, 4 + cj // g % 2)   # the position's parity at 1/g
                u = run("u", up_u, g, lambda: up_u.forward_window(patch(u, f), tap))
                ul = run("ul", up_ul, g, lambda: up_ul.forward_window(patch(ul, f), tap))

        if row:
            return None
        ul = at(ul, 1)
        if self.late_proj is not None:
            ul = ul + self.late_proj(cond)[:, :, None, None]
        return self.mixture(ul)

    def mixture(self, ul):
        """The output layer: (B, F, H, W) features -> (B, mixture channels, H, W), in float32
        even under autocast, as the loss is. In bf16 a mean near 1 would be rounded by up to a
        quarter of the width of one of the 256 bins, at every sub-pixel."""
        with torch.autocast(ul.device.type, enabled=False):
            return self.nin_out(F.elu(ul.to(torch.promote_types(ul.dtype, torch.float32))))

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


def load_model(path, device="cpu"):
    """Rebuild the model from a checkpoint alone (its state_dict records the architecture), in
    eval mode. Takes the best-model file or a pcnn_train resume file. Raises FileNotFoundError or
    ValueError with a one-line message naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python pcnn_train.py` "
                                f"or pass --checkpoint PATH")
    try:
        state_dict = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (a Git LFS pointer or a "
                         f"truncated download?): {one_line(err)}") from err
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]                     # a pcnn_train resume file
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    try:
        model = PixelCNN.from_state_dict(state_dict)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{path}: {one_line(err)}") from err
    return model.to(device).eval()


class LayerCache:
    """What `PixelCNN.forward_region` keeps between calls: the input x (B, C+1, H, W) with its
    channel of ones, the class embedding, and the full-size output of every layer, by layer."""

    def __init__(self, model, x, labels):
        self.x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)             # (B, C+1, H, W)
        self.cond = model.embedding(labels) if model.embedding is not None else None
        self.layers = {}

    def store(self, key, values, region, height, width):
        """Write `values` into the region ((r0, r1), (c0, c1)) of the cached output of `key`, a
        (B, C, height, width) tensor made on first use, and return the whole of it."""
        if key not in self.layers:
            self.layers[key] = values.new_zeros(*values.shape[:2], height, width).to(memory_format=torch.channels_last)
        full = self.layers[key]
        (r0, r1), (c0, c1) = region
        full[:, :, r0:r1 + 1, c0:c1 + 1] = values
        return full

    def store_for(self, block):
        """The `store` a GatedResNet uses for its hidden features."""
        return lambda values, region, height, width: self.store((block, "hidden"), values, region,
                                                                height, width)


# The zeros around every buffer of an IndexedCache: rows above, columns left and right. With them
# the patch every layer reads (rows p-2..p, columns q-2..q+1 around position (p, q)) lies inside
# its buffer at every position.
MARGIN_TOP, MARGIN_LEFT, MARGIN_RIGHT = 2, 2, 1
PATCH_ROWS, PATCH_COLS = 3, 4


def position_class(i):
    """The class of row or column i in `PixelCNN.forward_step`: 0 and 2 for i % 4 = 0 and 2, 1 for
    odd i. It fixes what a step there computes: the 1/2 resolution on even rows and columns, the 1/4
    on multiples of 4, and the parities at full and 1/2 resolution that pick the upsampling
    layers' taps."""
    return i % 4 if i % 2 == 0 else 1


class IndexedCache(LayerCache):
    """A LayerCache that `PixelCNN.forward_step` reads and writes through index tensors on the
    device instead of Python slices, so that a step's kernels and their arguments do not depend on
    the position (see forward_step).

    Every buffer has MARGIN_TOP rows of zeros above it and MARGIN_LEFT and MARGIN_RIGHT columns of
    zeros beside it, so the patch around any position has one shape, and the zeros stand where
    forward_window pads. Its layer outputs are channels-last, as LayerCache's, and `x` is not, so
    each layer reads patches laid out as forward_region's windows are. `x` and `layers[key]` are
    the buffers inside their margins: forward_region runs on this cache unchanged (a completion's
    kept rows use it). `move_to` points the indices at a position: the indices of every position are
    tables made once, on the device, and moving copies one row of them.
    """

    def __init__(self, model, x, labels):
        super().__init__(model, x, labels)
        B, _, H, W = self.x.shape
        self.size = (B, H, W)
        self.flat = {}            # key -> (flattened view of the padded buffer, its position dim)
        unpadded, self.x = self.x, self._allocate("x", self.x.shape[1], 1, self.x.dtype,
                                                  torch.contiguous_format)
        self.x.copy_(unpadded)
        self.pixel_table, self.pixel_slices = self._pixel_table(H, W, x.device)
        self.row_table, self.row_slices = self._row_table(H, W, x.device)
        self.pixel_index, self.row_index = self.pixel_table[0].clone(), self.row_table[0].clone()

    def move_to(self, i, j=None):
        """Point the indices at pixel (i, j), or at row i for a row step (j None). Call it outside
        a CUDA graph: it copies the position's row of the tables on the device."""
        if j is None:
            self.row_index.copy_(self.row_table[i])
        else:
            self.pixel_index.copy_(self.pixel_table[i * self.size[2] + j])

    def patch(self, key, f, row):
        """The patch of layer `key` (at 1/f resolution) around the position (p, q) there:
        (B, C, 3, 4) of rows p-2..p and columns q-2..q+1, or (B, C, 3, W/f) of rows p-2..p."""
        width = self.size[2] // f if row else PATCH_COLS
        return self._gather(key, self._index("patch", f, row), width)

    def at(self, key, f, row):
        """Layer `key`'s output at the position, (B, C, 1, 1), or on its row, (B, C, 1, W/f)."""
        return self._gather(key, self._index("at", f, row), self.size[2] // f if row else 1)

    def put(self, key, f, values, row):
        """Write values (B, C, 1, 1), or (B, C, 1, W/f) on the row, at the position into the first
        C channels of layer `key`'s output (made, zero, on first use)."""
        if key not in self.flat:
            self.layers[key] = self._allocate(key, values.shape[1], f, values.dtype,
                                              torch.channels_last)
        flat, dim = self.flat[key]
        index, C = self._index("at", f, row), values.shape[1]
        if dim == 1:                                         # channels-last: (B, positions, C)
            flat[:, :, :C].index_copy_(1, index, values.permute(0, 2, 3, 1).reshape(
                values.shape[0], -1, C))
        else:                                                # (B, C, positions)
            flat[:, :C].index_copy_(2, index, values.reshape(*values.shape[:2], -1))

    def noise(self, u):
        """The pixel's values of u (B, K, H, W), a tensor without margins: (B, K, 1, 1)."""
        return u.flatten(2).index_select(2, self.pixel_index[self.pixel_slices["noise"]])[..., None]

    def store(self, key, values, region, height, width):
        """LayerCache.store, into a buffer with margins."""
        if key not in self.layers:
            self.layers[key] = self._allocate(key, values.shape[1], self.size[1] // height,
                                              values.dtype, torch.channels_last)
        return super().store(key, values, region, height, width)

    def _allocate(self, key, channels, f, dtype, memory_format):
        """A zero buffer with margins for layer `key` at 1/f resolution; returns its inside."""
        B, H, W = self.size
        padded = torch.zeros(B, channels, H // f + MARGIN_TOP, W // f + MARGIN_LEFT + MARGIN_RIGHT,
                             dtype=dtype, device=self.x.device).to(memory_format=memory_format)
        if memory_format == torch.channels_last:
            self.flat[key] = padded.permute(0, 2, 3, 1).view(B, -1, channels), 1  # (B, N, C)
        else:
            self.flat[key] = padded.view(B, channels, -1), 2                      # (B, C, N)
        return padded[:, :, MARGIN_TOP:, MARGIN_LEFT:MARGIN_LEFT + W // f]

    def _gather(self, key, index, width):
        """The positions `index` of layer `key` as (B, C, len(index) / width, width), laid out as
        the buffer is."""
        flat, dim = self.flat[key]
        out = flat.index_select(dim, index)
        if dim == 1:
            return out.view(out.shape[0], -1, width, out.shape[2]).permute(0, 3, 1, 2)
        return out.view(*out.shape[:2], -1, width)

    def _index(self, kind, f, row):
        if row:
            return self.row_index[self.row_slices[kind, f]]
        return self.pixel_index[self.pixel_slices[kind, f]]

    @staticmethod
    def _pixel_table(H, W, device):
        """For every pixel (i, j), in raster order, the flat indices of the patch around
        (i // f, j // f) and of that position itself in a buffer at 1/f resolution (f = 1, 2, 4),
        and the pixel's index in an (H, W) tensor without margins. Returns the table
        (H * W, indices) and the slice of each kind of index in a row of it."""
        i, j = torch.arange(H)[:, None], torch.arange(W)[None, :]
        parts = {}
        for f in (1, 2, 4):
            width = W // f + MARGIN_LEFT + MARGIN_RIGHT
            at = (i // f + MARGIN_TOP) * width + j // f + MARGIN_LEFT          # (H, W)
            offsets = (torch.arange(1 - PATCH_ROWS, 1)[:, None] * width
                       + torch.arange(2 - PATCH_COLS, 2)).flatten()            # (12,)
            parts["patch", f] = at[..., None] + offsets                        # (H, W, 12)
            parts["at", f] = at[..., None]
        parts["noise"] = (i * W + j)[..., None]
        return _index_table(parts, H * W, device)

    @staticmethod
    def _row_table(H, W, device):
        """For every row i, the flat indices of rows i // f - 2 .. i // f and of row i // f in a
        buffer at 1/f resolution (f = 1, 2, 4). Returns the table (H, indices) and the slices."""
        i = torch.arange(H)[:, None]
        parts = {}
        for f in (1, 2, 4):
            width = W // f + MARGIN_LEFT + MARGIN_RIGHT
            start = (i // f + MARGIN_TOP) * width + MARGIN_LEFT                # (H, 1)
            offsets = (torch.arange(1 - PATCH_ROWS, 1)[:, None] * width
                       + torch.arange(W // f)).flatten()                       # (3 W/f,)
            parts["patch", f] = start + offsets                                # (H, 3 W/f)
            parts["at", f] = start + torch.arange(W // f)                      # (H, W/f)
        return _index_table(parts, H, device)


def _index_table(parts, n, device):
    """Concatenate index tensors of n rows ({name: (n, ...)}) into one (n, total) table on
    `device`, and the slice of each in a row of it."""
    columns, slices, start = [], {}, 0
    for name, t in parts.items():
        columns.append(t.reshape(n, -1))
        slices[name] = slice(start, start + columns[-1].shape[1])
        start = slices[name].stop
    return torch.cat(columns, dim=1).to(device), slices


def _window(full, region):
    """The region ((r0, r1), (c0, c1)) of a (B, C, H, W) tensor."""
    (r0, r1), (c0, c1) = region
    return full[:, :, r0:r1 + 1, c0:c1 + 1]


def _shifted_window(layer, x, region, down, right):
    """The region of the output of `layer` shifted down by `down` rows and right by `right`
    columns (zeros shifted in), as down_shift and right_shift do to the first layers."""
    (r0, r1), (c0, c1) = region
    top, left = max(0, down - r0), max(0, right - c0)
    if r1 - down < 0 or c1 - right < 0:                   # all of it shifted in
        return x.new_zeros(x.shape[0], layer.conv.out_channels, r1 - r0 + 1, c1 - c0 + 1)
    out = layer.forward_window(x, ((r0 - down + top, r1 - down), (c0 - right + left, c1 - right)))
    return F.pad(out, (left, 0, top, 0)) if top or left else out


def _architecture(config):
    return {k: v for k, v in config.items() if k != "dropout"}


def _format(config):
    return ", ".join(f"{k}={v!r}" for k, v in config.items())
