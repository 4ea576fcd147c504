//! Exactness of the rejection samplers on the CPU backend: the harness and its method are in
//! tests/common/sampling.rs; every scenario runs here on `specdec::cpu::rejection_verify`.

mod common;

use common::sampling::{self, Verify};

const CPU: Verify = specdec::cpu::rejection_verify;

#[test]
fn chi_square_p_values_match_tabulated_quantiles() {
    // Upper quantiles from standard tables: (df, x, P[X > x]).
    for (df, x, p) in [
        (1, 3.841, 0.05),
        (1, 6.635, 0.01),
        (5, 11.070, 0.05),
        (10, 23.209, 0.01),
        (30, 43.773, 0.05),
        (100, 135.807, 0.01),
    ] {
        let got = common::stats::chi_square_p_value(x, df);
        assert!((got - p).abs() < p * 2e-3, "df {df} x {x}: {got} vs {p}");
    }
    // Exact for df = 2: exp(-x/2).
    assert!((common::stats::chi_square_p_value(50.0, 2) - (-25.0f64).exp()).abs() < 1e-22);
}

#[test]
fn chain_with_draft_distributions_is_exact() {
    sampling::chain_with_draft_distributions_is_exact(CPU);
}

#[test]
fn chain_of_point_mass_drafts_is_exact() {
    sampling::chain_of_point_mass_drafts_is_exact(CPU);
}

#[test]
fn tree_of_top_children_is_exact() {
    sampling::tree_of_top_children_is_exact(CPU);
}

#[test]
fn tree_of_iid_children_is_exact() {
    sampling::tree_of_iid_children_is_exact(CPU);
}

#[test]
fn wide_iid_tree_with_repeated_children_is_exact() {
    sampling::wide_iid_tree_with_repeated_children_is_exact(CPU);
}

#[test]
fn temperatures_are_exact_on_both_rows() {
    sampling::temperatures_are_exact_on_both_rows(CPU);
}

#[test]
fn top_k_and_top_p_are_exact_on_both_rows() {
    sampling::top_k_and_top_p_are_exact_on_both_rows(CPU);
}

#[test]
fn half_precision_logits_and_probabilities_are_exact() {
    sampling::half_precision_logits_and_probabilities_are_exact(CPU);
}

#[test]
fn zero_target_probability_where_the_drafter_has_mass_is_never_emitted() {
    sampling::zero_target_probability_where_the_drafter_has_mass_is_never_emitted(CPU);
}

#[test]
fn zero_draft_probability_where_the_target_has_mass_is_exact() {
    sampling::zero_draft_probability_where_the_target_has_mass_is_exact(CPU);
}

#[test]
fn draft_parameters_of_their_own_are_exact() {
    sampling::draft_parameters_of_their_own_are_exact(CPU);
}

#[test]
fn a_drafter_sampling_its_unfiltered_softmax_keeps_the_target_distribution() {
    sampling::a_drafter_sampling_its_unfiltered_softmax_keeps_the_target_distribution(CPU);
}

#[test]
fn equal_distributions_accept_every_draft() {
    sampling::equal_distributions_accept_every_draft(CPU);
}

#[test]
fn disjoint_supports_reject_every_draft() {
    sampling::disjoint_supports_reject_every_draft(CPU);
}

#[test]
fn vocabulary_sizes_one_odd_and_large_are_exact() {
    sampling::vocabulary_sizes_one_odd_and_large_are_exact(CPU);
}

#[test]
fn mean_accepted_count_matches_its_expectation() {
    sampling::mean_accepted_count_matches_its_expectation(CPU);
}

#[test]
fn mutants_are_caught() {
    sampling::mutants_are_caught();
}

#[test]
fn a_coin_on_the_threshold_rejects_and_zero_probability_is_never_accepted() {
    sampling::a_coin_on_the_threshold_rejects_and_zero_probability_is_never_accepted(CPU);
}

#[test]
fn padded_drafts_are_rejected_not_verified() {
    sampling::padded_drafts_are_rejected_not_verified(CPU);
}
