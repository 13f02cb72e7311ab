"""Requests are validated at the API boundary: nothing that is not an integer id is served as one."""

import numpy as np
import pytest

from rcllm_sdk import validation
from rcllm_sdk.errors import InvalidRequestError, NotEnoughCandidatesError, RcLLMError


@pytest.mark.parametrize("bad", [1.9, 1.0, True, False, "1", "abc", None, 2**70, -(2**64), b"1", [1]])
def test_a_user_id_that_is_not_a_64_bit_integer_is_refused(bad):
    with pytest.raises(InvalidRequestError):
        validation.user_id(bad)


def test_integer_user_ids_pass_as_python_ints():
    assert validation.user_id(7) == 7
    got = validation.user_id(np.int64(7))
    assert got == 7 and type(got) is int
    assert validation.user_ids((1, np.int32(2))) == [1, 2]


@pytest.mark.parametrize("bad", ["12", b"12", 12, None])
def test_a_batch_must_be_a_collection_of_ids(bad):
    with pytest.raises(InvalidRequestError):
        validation.user_ids(bad)


def test_the_error_is_a_named_sdk_error_and_a_value_error():
    assert issubclass(InvalidRequestError, RcLLMError) and issubclass(InvalidRequestError, ValueError)


@pytest.fixture(scope="module")
def recommender(trained_repo):
    from rcllm_sdk import RcRecommender

    repo, _ = trained_repo
    with RcRecommender.from_feature_store(repo, mode="full") as rec:
        yield rec


@pytest.mark.parametrize("user", [1.9, True, "1", None, "abc", 2**70])
def test_recommend_refuses_a_non_integer_user_instead_of_serving_user_1(recommender, user):
    with pytest.raises(InvalidRequestError, match="user_id"):
        recommender.recommend(user, k=3)


@pytest.mark.parametrize("k", [2.5, "3", None, True])
def test_recommend_refuses_a_non_integer_k(recommender, k):
    with pytest.raises(InvalidRequestError, match="k must be an integer"):
        recommender.recommend(1, k=k)


def test_recommend_batch_refuses_a_string_and_serves_numpy_ids(recommender):
    with pytest.raises(InvalidRequestError):
        recommender.recommend_batch("12", k=3)
    served = recommender.recommend_batch(np.array([1, 2]), k=3)
    assert [r.user_id for r in served] == [1, 2]
    assert served[0].item_ids == recommender.recommend(1, k=3).item_ids
    with pytest.raises(NotEnoughCandidatesError):
        recommender.recommend(1, k=0)


@pytest.mark.parametrize("bad", [2.5, "12", [1.5, 2], [True, 2], [3, 3], []])
def test_client_candidates_that_are_not_a_list_of_distinct_item_ids_are_refused(recommender, bad):
    with pytest.raises(InvalidRequestError, match="candidates"):
        recommender.recommend(1, k=1, candidates=bad)
