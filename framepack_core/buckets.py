"""Resolution buckets: the sizes FramePack was trained on, and the one nearest an input image."""

# (height, width) around 640x640 pixels, as the original FramePack uses; each is a multiple of 16
BUCKETS_640 = ((416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
               (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416))


def nearest_bucket(height, width, resolution=640):
    """The bucket whose aspect ratio is closest to height:width, scaled to ``resolution`` (multiples of 16)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"Image size must be positive, got {height}x{width}.")
    if resolution <= 0:
        raise ValueError(f"Bucket resolution must be positive, got {resolution}.")
    # minimise |h*bw - w*bh| (the cross-multiplied aspect-ratio difference); on a tie the original keeps
    # the later bucket, so a square image gets 640x608 (h x w)
    bh, bw = min(reversed(BUCKETS_640), key=lambda b: abs(height * b[1] - width * b[0]))
    scale = resolution / 640
    return int(round(bh * scale / 16)) * 16, int(round(bw * scale / 16)) * 16
