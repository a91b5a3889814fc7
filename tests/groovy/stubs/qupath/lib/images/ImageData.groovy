package qupath.lib.images

import qupath.lib.images.servers.ImageServer
import qupath.lib.objects.PathObject
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import standin.ImageState

/** STAND-IN for QuPath's ImageData (not QuPath): {@code getServer()} and {@code getHierarchy()}. */
class ImageData<T> {
    private final PathObjectHierarchy hierarchy

    /** Stand-in: the image's objects (the stand-in image's list when it was opened). */
    ImageData(List<PathObject> objects) { hierarchy = new PathObjectHierarchy(objects) }

    ImageServer<T> getServer() { return (ImageServer<T>) ImageState.get().server() }

    PathObjectHierarchy getHierarchy() { return hierarchy }
}
