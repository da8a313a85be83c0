"""The FUSE adapter's node table: node ids <-> paths, as the kernel counts them."""

import pytest

from strata.vfs.errors import NoEntry
from strata.vfs.fuse import Nodes
from strata.vfs.kernel import ROOT_ID


def test_lookups_name_paths_and_forget_drops_a_node_at_zero():
    t = Nodes()
    d = t.remember(ROOT_ID, "d")
    f = t.remember(d, "f.txt")
    assert t.path(ROOT_ID) == "" and t.path(d) == "d" and t.path(f) == "d/f.txt"
    assert t.child(d, "g") == "d/g"
    assert t.remember(d, "f.txt") == f            # the same name: the same node, counted
    t.forget(f, 1)
    assert t.path(f) == "d/f.txt"                 # one lookup left
    t.forget(f, 1)
    with pytest.raises(NoEntry):
        t.path(f)
    assert t.remember(d, "f.txt") != f            # ids are never reused
    t.forget(ROOT_ID, 5)
    assert t.path(ROOT_ID) == ""                  # the root is never forgotten


def test_a_rename_moves_the_node_and_its_descendants_and_detaches_the_target():
    t = Nodes()
    a, b = t.remember(ROOT_ID, "a"), t.remember(ROOT_ID, "b")
    inner = t.remember(a, "inner.txt")
    old_b_file = t.remember(b, "x")
    t.moved(ROOT_ID, "a", ROOT_ID, "b")           # a replaces b
    assert t.path(a) == "b" and t.path(inner) == "b/inner.txt"
    with pytest.raises(NoEntry):
        t.path(b)                                 # the replaced folder left the tree
    with pytest.raises(NoEntry):
        t.path(old_b_file)
    assert t.find("b/inner.txt") == (a, inner)
    assert t.find("b/missing") == (a, None)
    assert t.find("gone/x") == (None, None)


def test_removed_and_retired_nodes_leave_the_tree_and_the_name_gets_a_new_node():
    t = Nodes()
    f = t.remember(ROOT_ID, "f")
    t.retire(f)
    assert t.path(f) == "f" and not t.is_live(f)     # still names its file
    g = t.remember(ROOT_ID, "f")
    assert g != f and t.path(g) == "f"
    t.forget(f, 1)                                # forgetting the retired one spares g
    assert t.path(g) == "f"
    t.removed(ROOT_ID, "f")
    assert not t.is_live(g)
    with pytest.raises(NoEntry):
        t.path(g)
