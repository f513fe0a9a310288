"""Which prompt each section uses, and smooth (blended) changes between timed prompts.

A timed prompt holds for the sections that start within its time range; elsewhere the main prompt
holds. Where the prompt changes from one section to the next, a blend of B sections (the incoming timed
prompt's ``blend_sections``, or the outgoing one's when the main prompt resumes) moves the embeddings
linearly: the k-th section from the change (k = 0 .. B-1) uses weight (k + 1) / (B + 1) of the new prompt,
so the new prompt starts to show at its own start time and holds fully B sections later.

Blending two encoded prompts of different lengths: both are padded with zeros to the longer one, tokens
outside a prompt's mask count as zeros, hidden states and pooled vectors are interpolated, and the mask
is the union of the two (both are prefix masks, so the union is the longer prefix).
"""

import dataclasses

import torch


def _masked_text(prompt, length):
    """(text zeroed outside its mask and zero-padded to ``length``, boolean mask of ``length``)."""
    text, tokens = prompt.text.float(), prompt.text.shape[1]
    mask = torch.ones(text.shape[:2], dtype=torch.bool) if prompt.mask is None else prompt.mask.bool().cpu()
    text = text * mask.to(text.device)[..., None]
    pad = length - tokens
    return (torch.nn.functional.pad(text, (0, 0, 0, pad)),
            torch.nn.functional.pad(mask, (0, pad), value=False))


def blend_prompts(a, b, weight):
    """``a`` moved toward ``b`` by ``weight`` (0: a, 1: b, both returned unchanged)."""
    if weight <= 0:
        return a
    if weight >= 1:
        return b
    length = max(a.text.shape[1], b.text.shape[1])
    text_a, mask_a = _masked_text(a, length)
    text_b, mask_b = _masked_text(b, length)
    return dataclasses.replace(a, text=torch.lerp(text_a, text_b, weight),
                               pooled=torch.lerp(a.pooled.float(), b.pooled.float(), weight), mask=mask_a | mask_b)


def section_prompts(section_starts, timed, main):
    """The prompt of each video section (temporal order) whose start times in seconds are ``section_starts``."""
    targets = [next((t for t in timed if t.start <= s < t.end), None) for s in section_starts]
    prompt_of = lambda target: main if target is None else target.prompt  # noqa: E731
    prompts = []
    for i, target in enumerate(targets):
        change = i
        while change > 0 and targets[change - 1] is target:
            change -= 1
        if change == 0:
            prompts.append(prompt_of(target))
            continue
        previous = targets[change - 1]
        blend = (target if target is not None else previous).blend_sections
        weight = 1.0 if i - change >= blend else (i - change + 1) / (blend + 1)
        prompts.append(blend_prompts(prompt_of(previous), prompt_of(target), weight))
    return prompts
