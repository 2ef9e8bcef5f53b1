"""The "did you mean" of every refusal of a name."""

import itertools

from prunekit.suggest import closest, edits


def test_edits_is_the_levenshtein_distance_of_a_brute_force():
    # against the shortest of all edit scripts, found by breadth-first search over strings
    def brute(a, b, alphabet="abc"):
        frontier, seen, steps = {a}, {a}, 0
        while b not in frontier:
            grown = set()
            for word in frontier:
                for i in range(len(word) + 1):
                    grown.add(word[:i] + word[i + 1:])
                    for char in alphabet:
                        grown.update({word[:i] + char + word[i:], word[:i] + char + word[i + 1:]})
            frontier, steps = grown - seen, steps + 1
            seen |= grown
        return steps
    words = ["".join(w) for n in range(4) for w in itertools.product("abc", repeat=n)]
    for a, b in itertools.product(words[::3], words[::5]):
        assert edits(a, b) == brute(a, b), (a, b)


def test_a_tie_goes_to_the_fewer_edits_then_to_the_earlier_choice():
    names = ["mlpnet", "resnet20", "resnet32", "resnet20-b"]
    assert closest("resnet21", names) == "resnet20"         # difflib alone: resnet32
    assert closest("resnet20b", names) == "resnet20-b"
    assert closest("abcd", ["abcx", "abcy"]) == "abcx" and closest("abcd", ["abcy", "abcx"]) == "abcy"


def test_nothing_close_suggests_nothing():
    assert closest("zzz", ["mlpnet", "resnet20"]) is None
    assert closest("x", []) is None
