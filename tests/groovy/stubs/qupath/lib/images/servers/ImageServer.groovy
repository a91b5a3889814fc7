package qupath.lib.images.servers

/**
 * STAND-IN for QuPath's ImageServer interface (not QuPath). {@code getURIs()} is what the
 * scripts use: the image's URIs, e.g. file:/C:/slides/a.svs (Java's URI.toString()).
 * {@code getPath()} is an identifier, not a file path, in QuPath too.
 */
interface ImageServer<T> {
    Collection<URI> getURIs()

    String getPath()
}
