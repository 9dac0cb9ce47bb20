output "hub_address" {
  description = "The load balancer's address: point the hub's DNS name and *.<preview_domain> here."
  value       = google_compute_address.hub.address
}

output "hub_service_account" {
  description = "The hub's service account."
  value       = google_service_account.hub.email
}

output "artifact_registry" {
  description = "Artifact Registry repository for the hub image and workspace image artifacts."
  value       = "${var.region}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
}

output "scheduler_service_account" {
  description = "The account whose OIDC tokens POST /cleanup accepts."
  value       = google_service_account.scheduler.email
}
