"""The pack loads through ComfyUI's custom-node loader and registers every node with tooltips."""

EXPECTED = {"FramePackModelLoader", "FramePackSchedule", "FramePackSampler", "FramePackDecode",
            "FramePackDecodeToVideo", "FramePackResolutionBucket", "FramePackKeyframe", "FramePackTimedPrompt",
            "FramePackLoraLoader", "FramePackMagCacheCalibrate", "FramePackSingleFrame"}


def test_pack_registers_its_nodes(comfy):
    assert EXPECTED <= set(comfy.pack)
    for name in EXPECTED:
        assert name in comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS


def test_every_input_has_a_tooltip_and_nodes_share_a_category(comfy):
    for name, cls in comfy.pack.items():
        assert cls.CATEGORY.startswith("FramePack"), name
        assert getattr(cls, "DESCRIPTION", ""), f"{name} has no description"
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, (kind, *options) in spec.get(section, {}).items():
                assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
