import re

import pytest

from keys import keyformat


def test_keys_carry_a_scannable_prefix_and_enough_randomness():
    new = keyformat.generate("l")
    assert re.fullmatch(r"tg_l_[0-9A-Za-z]{49}", new.secret)
    assert new.prefix == new.secret[:12]
    assert keyformat.generate("t").secret.startswith("tg_t_")
    assert len({keyformat.generate().secret for _ in range(200)}) == 200


def test_well_formed_key_passes_the_checksum():
    assert keyformat.is_well_formed(keyformat.generate().secret)


@pytest.mark.parametrize("position", [5, 20, 47, -1])
def test_a_single_mistyped_character_is_rejected_without_a_lookup(position):
    secret = keyformat.generate().secret
    index = position % len(secret)
    typo = "a" if secret[index] != "a" else "b"
    assert not keyformat.is_well_formed(secret[:index] + typo + secret[index + 1:])


@pytest.mark.parametrize("candidate", ["", "tg_l_short", "sk-" + "a" * 49, "tg_x_" + "a" * 49, "tg_l_" + "!" * 49])
def test_malformed_keys_are_rejected(candidate):
    assert not keyformat.is_well_formed(candidate)


def test_only_the_hash_identifies_a_key():
    new = keyformat.generate()
    assert new.hash == keyformat.hash_key(new.secret) and len(new.hash) == 64
    assert new.secret not in new.hash
    assert keyformat.matches(new.secret, new.hash)
    assert not keyformat.matches(keyformat.generate().secret, new.hash)


def test_unknown_environment_is_refused():
    with pytest.raises(ValueError):
        keyformat.generate("x")
