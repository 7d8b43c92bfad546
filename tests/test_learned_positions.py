"""Learned absolute positions refuse a position outside their table by name.

`nn.Embedding` raised a bare IndexError (a device-side assert on GPU), e.g. when `generate` ran past
`max_position_embeddings`.
"""

import pytest
import torch

from modeling_mom import MoEUTForCausalLM, MoMForCausalLM

from .test_moduleformer import tiny_model as moduleformer_model
from .test_moeut import tiny_config as moeut_config
from .test_mom import tiny_config as mom_config

POSITIONS = 16
MODELS = {
    "mom": lambda: MoMForCausalLM(mom_config(max_position_embeddings=POSITIONS)),
    "moeut": lambda: MoEUTForCausalLM(
        moeut_config(position_embedding_type="learned_absolute", max_position_embeddings=POSITIONS)
    ),
    "moduleformer": lambda: moduleformer_model(position_embedding_type="learned", max_position_embeddings=POSITIONS),
}
MESSAGE = rf"position {POSITIONS} is outside the model's learned positions 0..{POSITIONS - 1}"


@pytest.mark.parametrize("name", MODELS)
def test_positions_past_the_table_are_refused_by_name(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(3, 50, (1, POSITIONS - 4))
    generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)  # ends at the last position
    assert generated.shape[1] == POSITIONS + 1  # its last token is never fed back
    with pytest.raises(ValueError, match=MESSAGE):
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with pytest.raises(ValueError, match=MESSAGE):
        model(torch.randint(3, 50, (1, POSITIONS + 1)))
    with pytest.raises(ValueError, match="position -1 is outside"):
        model(ids[:, :2], position_ids=torch.tensor([[-1, 0]]))
